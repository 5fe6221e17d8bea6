"""Artifact downloads in flight, per job: deleting a job never cuts a download that has begun.

DELETE removes the job's record at once (204); its files go when the last of its downloads in this
process ends, however it ends (finished, or the client went away).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class Downloads:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: Counter[str] = Counter()
        self._pending: dict[str, Callable[[], None]] = {}

    def begin(self, job_id: str) -> None:
        with self._lock:
            self._active[job_id] += 1

    def end(self, job_id: str) -> Callable[[], None] | None:
        """The removal to run now, if this was the deleted job's last download."""
        with self._lock:
            self._active[job_id] -= 1
            if self._active[job_id] > 0:
                return None
            del self._active[job_id]
            return self._pending.pop(job_id, None)

    def remove_when_idle(self, job_id: str, remove: Callable[[], None]) -> bool:
        """Run `remove` now (True) or once the job's downloads end (False)."""
        with self._lock:
            if self._active[job_id] > 0:
                self._pending[job_id] = remove
                return False
            self._active.pop(job_id, None)
        remove()
        return True


class DownloadResponse(StreamingResponse):
    """A streamed download counted in `downloads` from its creation until it has been sent or dropped."""

    def __init__(self, downloads: Downloads, job_id: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.downloads, self.job_id = downloads, job_id
        downloads.begin(job_id)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            remove = self.downloads.end(self.job_id)
            if remove is not None:
                await run_in_threadpool(remove)
