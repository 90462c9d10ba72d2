"""Shard format, validation, synthetic and real datasets, few-shot splits, Ray Data streams."""
