"""Training: the one loop per regime, checkpoints, and how a run is placed on Ray."""
