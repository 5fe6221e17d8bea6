"""Conditional and ranged downloads of an artifact, the same for local files and remote storage.

RFC 9110: If-None-Match (weak comparison, `*`) answers 304; one Range (a-b, a-, -n) answers 206 with
Content-Range, or 416 (problem+json, `Content-Range: bytes */size`) when nothing of it is in the file;
a malformed, reversed or multiple Range is ignored (14.2: a server may ignore Range) and the whole
file is sent; If-Range (strong comparison) keeps a Range only while the ETag still matches. HEAD gets
the same status and headers without the body.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

from fastapi.responses import Response, StreamingResponse

from shears.server.problems import problem_response
from shears.server.storage import read_span

_ONE_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")


class Unsatisfiable(ValueError):
    """No byte of the range is in the file (416)."""


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a single satisfiable range; None to serve the whole file.
    Raises Unsatisfiable when the range is well formed but outside the file."""
    match = _ONE_RANGE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None  # malformed or several ranges: ignored
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # a suffix: the last n bytes
        count = int(last)
        if count == 0 or size == 0:
            raise Unsatisfiable("empty suffix range")
        return max(0, size - count), size - 1
    start = int(first)
    if last and int(last) < start:
        return None  # reversed: not a valid range-spec, so the header is ignored
    if start >= size:
        raise Unsatisfiable("range starts past the end")
    end = min(int(last), size - 1) if last else size - 1
    return start, end


def _tags(header: str) -> list[str]:
    return [tag.strip() for tag in header.split(",") if tag.strip()]


def none_match(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match matches (304): `*`, or any listed tag equal to the ETag under weak comparison."""
    if not if_none_match:
        return False
    opaque = etag.removeprefix("W/")
    return any(tag == "*" or tag.removeprefix("W/") == opaque for tag in _tags(if_none_match))


def read_file(path: Path) -> Callable[[int, int | None], Iterator[bytes]]:
    """A `read(start, length)` over a local file."""

    def read(start: int, length: int | None) -> Iterator[bytes]:
        with open(path, "rb") as handle:
            yield from read_span(handle, start, length)

    return read


def ranged_response(
    read: Callable[[int, int | None], Iterator[bytes]],
    *,
    size: int,
    etag: str,
    filename: str,
    range_header: str | None,
    if_range: str | None,
    if_none_match: str | None = None,
    head: bool = False,
    stream: Callable[..., Response] = StreamingResponse,
) -> Response:
    """`stream(content, status_code=, media_type=, headers=)` makes the streamed answer."""
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, max-age=0, must-revalidate",
        "Content-Disposition": (
            f'attachment; filename="{filename}"'
            if quote(filename) == filename
            else f"attachment; filename*=utf-8''{quote(filename)}"
        ),
    }
    if none_match(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": headers["Cache-Control"]})
    wanted = None
    if range_header and (if_range is None or if_range.strip() == etag):
        try:
            wanted = parse_range(range_header, size)
        except Unsatisfiable:
            return problem_response(
                416,
                "range_not_satisfiable",
                f"the file has {size} bytes; ask for a range inside them (e.g. bytes=0-{max(size - 1, 0)})",
                headers={**headers, "Content-Range": f"bytes */{size}"},
            )
    media = "application/octet-stream"
    status, start, length = 200, 0, size
    if wanted is not None:
        status, start, length = 206, wanted[0], wanted[1] - wanted[0] + 1
        headers["Content-Range"] = f"bytes {wanted[0]}-{wanted[1]}/{size}"
    headers["Content-Length"] = str(length)
    if head:
        return Response(status_code=status, media_type=media, headers=headers)
    return stream(
        read(start, None if status == 200 else length), status_code=status, media_type=media, headers=headers
    )
