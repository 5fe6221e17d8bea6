"""Server-Sent Events for a job: every stored event with its id, resumable with Last-Event-ID.

The stream polls the store (the API process shares nothing with workers but the store) and ends
with an `end` event once the job is finished and every event was sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from shears.server.models import TERMINAL
from shears.server.schemas import event_out
from shears.server.store import Store

POLL_SECONDS = 0.25
KEEPALIVE_SECONDS = 15.0


def format_event(event_id: int | None, name: str, data: str) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {data}\n\n"


async def stream(request: Request, store: Store, job_id: str, after: int) -> AsyncIterator[str]:
    yield "retry: 1000\n\n"
    last_write = time.monotonic()
    while True:
        if await request.is_disconnected() or getattr(request.app.state, "stopping", False):
            return
        events = await run_in_threadpool(store.events, job_id, after, 500)
        if not events:
            job = await run_in_threadpool(store.get_job, job_id)
            if job is None or job.status in TERMINAL:
                # Events are written in the same transaction as the status: read them once more.
                for event in await run_in_threadpool(store.events, job_id, after, 10_000):
                    yield format_event(event.seq, event.kind, event_out(event).model_dump_json())
                status = job.status if job is not None else "deleted"
                yield format_event(None, "end", json.dumps({"status": status}))
                return
        for event in events:
            yield format_event(event.seq, event.kind, event_out(event).model_dump_json())
            after = event.seq
            last_write = time.monotonic()
        if events:
            continue
        if time.monotonic() - last_write > KEEPALIVE_SECONDS:
            yield ": keepalive\n\n"
            last_write = time.monotonic()
        await asyncio.sleep(POLL_SECONDS)
