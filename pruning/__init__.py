"""Shears' pruning engine: block-by-block one-shot SparseGPT, Wanda and magnitude pruning."""

__version__ = "0.1.0"
