"""Training recipe: metrics, the loop, checkpoints, distributed training."""
