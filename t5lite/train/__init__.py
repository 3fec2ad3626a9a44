"""Training: partitioning, optimizers, the train step, the loop and checkpoints."""
