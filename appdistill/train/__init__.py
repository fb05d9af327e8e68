"""Training: one train() for single process and torchrun."""
