"""Shards, converters and Ray Data readers."""
