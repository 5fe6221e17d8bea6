"""Shears' pruning engine: block-by-block one-shot SparseGPT, Wanda and magnitude pruning."""
