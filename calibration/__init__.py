"""Calibration and evaluation text for Shears: sources, tokenisation, deterministic windows, batching.

Import the modules themselves: `sources` and `builtin` need no torch (the API process admits
requests with them), `windows` does.
"""
