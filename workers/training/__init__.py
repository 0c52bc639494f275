"""A pack's run: data, batches, the training loop, checkpoints."""
