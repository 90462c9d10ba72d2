"""Frozen encoders (open_clip, timm, transformers, sentence-transformers) and Ray Data feature extraction."""
