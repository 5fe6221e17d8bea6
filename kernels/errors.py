"""The one error kernels/ raises for bad packed data: a ValueError that names the tensor and the fault."""

from __future__ import annotations

from shears.errors import InvalidRequest


class PackedFormatError(InvalidRequest, ValueError):
    """A packed tensor or file is malformed, of an unknown format version, or does not fit its pattern."""

    code = "invalid_request"
