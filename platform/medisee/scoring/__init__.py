"""Batch scoring of archives on Ray Data."""
