"""Validation of result items against the labeling config: checks.py (regions), files.py (import files)."""
