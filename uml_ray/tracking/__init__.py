"""Tracking: MLflow runs, metrics, artifacts and best-config queries."""
