"""Pretraining: config, the training loop, the DeepSpeed engine, checkpoints, the run directory."""
