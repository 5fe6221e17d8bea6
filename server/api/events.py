"""/v1/jobs/{id}/events: the job's events as a JSON page, or a Server-Sent Events stream."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from shears.server import events
from shears.server.api.jobs import JobId, find_job
from shears.server.deps import StoreDep
from shears.server.schemas import EventList, event_out

router = APIRouter(prefix="/v1/jobs", tags=["events"])


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
    after: Annotated[int, Query(ge=0, le=2**31, description="return events with a larger id")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
    accept: Annotated[str | None, Header(max_length=1000)] = None,
) -> EventList | StreamingResponse:
    job = await run_in_threadpool(find_job, store, job_id)
    if accept and "text/event-stream" in accept:
        if last_event_id and last_event_id.strip().isdigit():
            after = max(after, int(last_event_id.strip()))
        return StreamingResponse(
            events.stream(request, store, job.id, after),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    page = await run_in_threadpool(store.events, job.id, after, limit)
    return EventList(
        events=[event_out(e) for e in page], next_cursor=page[-1].seq if page else after, status=job.status
    )  # type: ignore[arg-type]
