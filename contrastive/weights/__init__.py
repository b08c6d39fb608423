"""Public checkpoints in and out of the two-tower recipes (`python -m contrastive.weights`)."""
