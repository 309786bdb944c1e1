"""Embedded fine-tuning tasks built from local sources (no download)."""
