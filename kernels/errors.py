"""The one error kernels/ raises for bad packed data: a ValueError that names the tensor and the fault."""

from __future__ import annotations

try:  # the engine's error hierarchy, so the server reports it as the user's fault (invalid_request)
    from pruning.errors import InvalidRequest as _Base
except ImportError:  # kernels/ alone on a bare GPU box
    _Base = Exception  # type: ignore[assignment,misc]


class PackedFormatError(_Base, ValueError):
    """A packed tensor or file is malformed, of an unknown format version, or does not fit its pattern."""

    code = "invalid_request"
