"""Follow a job's events in the terminal: one tqdm bar per phase with progress, a line per state change."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from shears.client.client import ShearsClient


def follow(client: ShearsClient, job_id: str, *, quiet: bool = False, after: int = 0) -> dict[str, Any]:
    """Stream the job's events until it ends; returns the finished job."""
    bar: tqdm | None = None
    try:
        for event in client.stream_events(job_id, after=after):
            if quiet:
                continue
            kind, phase = event["kind"], event.get("phase")
            if kind == "progress" and event.get("total"):
                if bar is None or bar.desc != phase:
                    if bar is not None:
                        bar.close()
                    bar = tqdm(total=event["total"], desc=phase, unit="block", file=sys.stderr, leave=True)
                bar.n = event["done"]
                bar.refresh()
                continue
            if bar is not None:
                bar.close()
                bar = None
            if kind == "state":
                tqdm.write(f"[{event['data'].get('status')}] {event['message']}", file=sys.stderr)
            elif kind == "phase":
                tqdm.write(f"  {phase}: {event['message']}", file=sys.stderr)
            elif kind == "resumed":
                tqdm.write(f"  {event['message']} (attempt {event['attempt']})", file=sys.stderr)
            elif kind == "log" and event["message"] != "traceback":
                tqdm.write(f"  {event['message']}", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
    return client.job(job_id)
