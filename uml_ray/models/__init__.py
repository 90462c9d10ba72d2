"""Plain PyTorch models (no Ray, MLflow or Optuna imports)."""
