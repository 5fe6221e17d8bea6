"""Prometheus metrics, read from the job store at scrape time (so every API replica reports the same)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from shears.server.models import ACTIVE, STATUSES
from shears.server.store import Store

_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200)


class JobCollector(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        counts = self.store.counts()
        jobs = GaugeMetricFamily("shears_jobs", "Jobs in the store by status", labels=["status"])
        for status in STATUSES:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        yield GaugeMetricFamily("shears_queue_depth", "Jobs waiting to start", value=counts.get("queued", 0))
        yield GaugeMetricFamily(
            "shears_jobs_active",
            "Jobs with a worker (running or cancelling)",
            value=sum(counts.get(s, 0) for s in ACTIVE),
        )
        durations = HistogramMetricFamily(
            "shears_job_duration_seconds", "Start-to-finish time of finished jobs", labels=["status"]
        )
        by_status: dict[str, list[float]] = {}
        for status, seconds in self.store.durations():
            by_status.setdefault(status, []).append(seconds)
        for status, values in sorted(by_status.items()):
            buckets = [(str(b), sum(v <= b for v in values)) for b in _BUCKETS] + [("+Inf", len(values))]
            durations.add_metric([status], buckets, sum(values))
        yield durations


def make_registry(store: Store) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobCollector(store))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
