"""Shears: one-shot LLM pruning as a service.

The `shears` package is the floor every other part stands on (errors, progress events, the
manifest and its hashing, `Pattern`, strict base models, the top-level command line) and the one
name Shears installs. The other parts live in top-level folders of the source tree and are
installed beneath it: `shears.calibration` (calibration/), `shears.kernels` (kernels/),
`shears.pruning` (pruning/), `shears.server` (server/), `shears.client` (client/). See
docs/architecture.md for what may import what.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

# Run from a source checkout without installing (the GPU machine has no registry): the parts are
# folders beside this one, so let them resolve as shears.<part>. An installed copy has them inside.
_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "pruning" / "__init__.py").is_file():
    __path__.append(str(_ROOT))
