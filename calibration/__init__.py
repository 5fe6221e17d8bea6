"""Calibration and evaluation text for Shears: sources, tokenisation, deterministic windows, batching."""

from calibration.builtin import EVALUATION_WORKS, builtin_documents
from calibration.sources import HFSpec, open_source, parse_hf_spec
from calibration.windows import TokenWindows, iter_batches, load_windows, save_windows

__all__ = [
    "EVALUATION_WORKS",
    "HFSpec",
    "TokenWindows",
    "builtin_documents",
    "iter_batches",
    "load_windows",
    "open_source",
    "parse_hf_spec",
    "save_windows",
]
