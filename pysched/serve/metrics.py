"""Prometheus metrics of one application (its own registry, so several apps can live in one process).

Event counters and histograms are updated where the events happen, through
label children bound once (a counter increment is one method call). The
fleet's state (nodes by status, pool capacity and in-flight jobs,
reservations) is read from the scheduler's snapshot when ``/metrics`` is
scraped, so it costs nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pysched._layout import STATUS_READY
from pysched.scheduler import Scheduler

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: dispatch takes microseconds: buckets from 10 µs to 0.25 s
_DISPATCH_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.25)
#: end to end includes the node's work: 100 µs to 2 min
_JOB_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 1.5e-3, 2e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _FleetCollector(Collector):
    """Nodes by status, pool capacity and in-flight, read from the snapshot at scrape time."""

    def __init__(self, scheduler: Scheduler, server_stats: Callable[[], dict[str, Any]]) -> None:
        self.scheduler = scheduler
        self.server_stats = server_stats

    def describe(self) -> list[GaugeMetricFamily]:
        # Nothing to describe up front: collect() reads live state, which is
        # not there yet while the application is being built.
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.scheduler.stats()
        nodes = GaugeMetricFamily("pysched_nodes", "Registered nodes by status", labels=["status"])
        for status, count in stats["nodes"].items():
            nodes.add_metric([status], count)
        yield nodes

        snap = self.scheduler.snapshot
        capacity = GaugeMetricFamily("pysched_pool_capacity",
                                     "Sum of max_concurrency over the ready nodes of a pool", labels=["pool"])
        in_flight = GaugeMetricFamily("pysched_pool_in_flight", "Jobs holding capacity on a pool's nodes",
                                      labels=["pool"])
        members = GaugeMetricFamily("pysched_pool_nodes", "Nodes in a pool", labels=["pool"])
        offsets = snap.pool_offsets
        status = snap.nodes["status"]
        conc = snap.nodes["max_concurrency"]
        inflight = snap.inflight
        for i, pool_id in enumerate(snap.pool_ids):
            meta = snap.pools.get(pool_id)
            name = meta.name if meta is not None else str(pool_id)
            slots = snap.pool_members[offsets[i]:offsets[i + 1]]
            ready = slots[status[slots] == STATUS_READY]
            capacity.add_metric([name], float(np.sum(conc[ready], dtype=np.int64)))
            in_flight.add_metric([name], float(np.sum(inflight[slots], dtype=np.int64)))
            members.add_metric([name], float(len(slots)))
        yield capacity
        yield in_flight
        yield members

        reservations = GaugeMetricFamily("pysched_reservations", "Reservations the backend holds")
        reservations.add_metric([], stats.get("reservations", 0))
        yield reservations
        backend = stats.get("backend")
        if isinstance(backend, dict):
            up = GaugeMetricFamily("pysched_backend_available", "1 when the reservation backend answers",
                                   labels=["backend"])
            up.add_metric([str(backend.get("name"))], 1.0 if backend.get("available") else 0.0)
            yield up
        server = self.server_stats()
        jobs = GaugeMetricFamily("pysched_jobs_in_flight", "Jobs this server is delivering")
        jobs.add_metric([], server["jobs_in_flight"])
        yield jobs
        draining = GaugeMetricFamily("pysched_draining", "1 while the server drains for shutdown")
        draining.add_metric([], 1.0 if server["draining"] else 0.0)
        yield draining


class Metrics:
    """Every metric of one application, in its own :class:`CollectorRegistry`.

    :param scheduler: read at scrape time for the fleet's figures.
    :param server_stats: returns the server's own figures (``jobs_in_flight``, ``draining``) at scrape time.
    """

    def __init__(self, scheduler: Scheduler, server_stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.dispatches = Counter("pysched_dispatches", "Dispatch decisions by outcome and reason",
                                  ["outcome", "reason"], registry=r)
        self.dispatch_seconds = Histogram("pysched_dispatch_seconds", "Time in Scheduler.dispatch",
                                          buckets=_DISPATCH_BUCKETS, registry=r)
        self.job_seconds = Histogram("pysched_job_seconds", "End to end: request received to answer sent",
                                     ["endpoint"], buckets=_JOB_BUCKETS, registry=r)
        self.jobs = Counter("pysched_jobs", "Jobs answered, by outcome (result or error code)", ["outcome"],
                            registry=r)
        self.failovers = Counter("pysched_failovers", "Attempts that failed and were redelivered or ended",
                                 ["reason"], registry=r)
        self.heartbeats = Counter("pysched_heartbeats", "Heartbeats received, by result", ["result"], registry=r)
        self.connections = Gauge("pysched_connections", "Open WebSocket connections", ["kind"], registry=r)
        self.connections_total = Counter("pysched_connections_opened", "WebSocket connections accepted",
                                         ["kind"], registry=r)
        self.closes = Counter("pysched_connections_closed", "WebSocket connections closed, by close code",
                              ["kind", "code"], registry=r)
        self.refused = Counter("pysched_messages_refused", "Messages answered with an error frame, by code",
                               ["kind", "code"], registry=r)
        self.http_refused = Counter("pysched_http_refused", "HTTP requests refused, by status and code",
                                    ["status", "code"], registry=r)
        r.register(_FleetCollector(scheduler, server_stats))

        # children bound once for the hot paths
        self.dispatch_ok = self.dispatches.labels("ok", "")
        self.heartbeat_applied = self.heartbeats.labels("applied")
        self.heartbeat_refused = self.heartbeats.labels("refused")
        self.job_result = self.jobs.labels("result")
        self.observe_dispatch = self.dispatch_seconds.observe
        self._endpoint = {name: self.job_seconds.labels(name).observe for name in ("jobs", "sessions")}
        # Pre-create the label sets a dashboard expects to see at zero.
        for kind in ("node", "session"):
            self.connections.labels(kind)
            self.connections_total.labels(kind)
        for reason in ("node_lost", "timeout", "retry", "expired"):
            self.failovers.labels(reason)

    def observe_job(self, endpoint: str, seconds: float) -> None:
        """Record one job's end-to-end time.

        :param endpoint: ``"jobs"`` (``POST /v1/jobs``) or ``"sessions"`` (session streams).
        :param seconds: from the request's arrival to its answer.
        """
        self._endpoint[endpoint](seconds)

    def exposition(self) -> bytes:
        """Every metric, in the Prometheus text format (``GET /metrics``)."""
        return generate_latest(self.registry)

