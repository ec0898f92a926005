"""The shared training recipe: data, model, objectives, loop, checkpoints, metrics."""
