"""The fine-tuning recipe on Ray Train."""
