"""Training (one loop for every method), checkpoints, and prediction."""
