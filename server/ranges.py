"""HTTP Range for files streamed from remote storage, answering as Starlette's FileResponse does for
local files: Accept-Ranges, 206 + Content-Range for one range (a-b, a-, -n), If-Range against the
ETag, 416 + `Content-Range: bytes */size` when nothing of the file is in range. A multi-range request
gets the whole file (a server may ignore Range, RFC 9110 14.2)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from urllib.parse import quote

from fastapi.responses import Response, StreamingResponse

_ONE_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a single satisfiable range; None to serve the whole file.
    Raises ValueError when the range cannot be satisfied (416)."""
    match = _ONE_RANGE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None  # malformed or several ranges: ignored
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # a suffix: the last n bytes
        count = int(last)
        if count == 0:
            raise ValueError("empty suffix range")
        return max(0, size - count), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise ValueError("range starts past the end")
    return start, end


def ranged_response(
    read: Callable[[int, int | None], Iterator[bytes]],
    *,
    size: int,
    etag: str,
    filename: str,
    range_header: str | None,
    if_range: str | None,
) -> Response:
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
    wanted = None
    if range_header and (if_range is None or if_range.strip() == etag):
        try:
            wanted = parse_range(range_header, size)
        except ValueError:
            return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    media = "application/octet-stream"
    if wanted is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(read(0, None), media_type=media, headers=headers)
    start, end = wanted
    headers["Content-Length"] = str(end - start + 1)
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return StreamingResponse(read(start, end - start + 1), status_code=206, media_type=media, headers=headers)
