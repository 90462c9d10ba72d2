"""Search: search spaces, and Ray Tune + Optuna + ASHA driving every run."""
