"""Reading and writing files: configs, weights, model folders, checkpoints."""
