"""Checkpoint conversion to and from other frameworks (HF transformers T5)."""
