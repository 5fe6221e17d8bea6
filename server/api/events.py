"""/v1/jobs/{id}/events: the job's events as a JSON page, or a Server-Sent Events stream."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from shears.server import events
from shears.server.api.jobs import JobId, find_job
from shears.server.deps import StoreDep
from shears.server.problems import Problem
from shears.server.schemas import EventList, event_out

router = APIRouter(prefix="/v1/jobs", tags=["events"])
_EVENT_ID = re.compile(r"[0-9]{1,10}")
MAX_EVENT_ID = 2**31


def _event_id(header: str) -> int:
    """Last-Event-ID as an event id: ASCII digits, at most 2^31 (the largest `after`)."""
    text = header.strip()
    if not _EVENT_ID.fullmatch(text) or int(text) > MAX_EVENT_ID:
        raise Problem(
            400,
            "bad_last_event_id",
            f"Last-Event-ID must be an event id this server sent (an integer from 0 to {MAX_EVENT_ID})",
        )
    return int(text)


@router.get(
    "/{job_id}/events",
    response_model=EventList,
    summary="Events after a cursor; SSE with Accept: text/event-stream",
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "JSON page, or an SSE stream (ids = event ids; resume with Last-Event-ID)",
        }
    },
)
async def job_events(
    job_id: JobId,
    request: Request,
    store: StoreDep,
    after: Annotated[int, Query(ge=0, le=MAX_EVENT_ID, description="return events with a larger id")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", max_length=20, description="the last event id received (SSE resume)"),
    ] = None,
    accept: Annotated[str | None, Header(max_length=1000)] = None,
) -> EventList | StreamingResponse:
    job = await run_in_threadpool(find_job, store, job_id)
    if accept and "text/event-stream" in accept:
        if last_event_id is not None and last_event_id.strip():
            after = max(after, _event_id(last_event_id))
        return StreamingResponse(
            events.stream(request, store, job.id, after),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    page = await run_in_threadpool(store.events, job.id, after, limit)
    return EventList(
        events=[event_out(e) for e in page], next_cursor=page[-1].seq if page else after, status=job.status
    )  # type: ignore[arg-type]
