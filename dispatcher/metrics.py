"""Prometheus metrics of the dispatcher (own registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class DispatchMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.alerts_in = Counter(
            "proctor_dispatch_alerts_in_total", "Envelopes read from the outbox", ["lane"], registry=r
        )
        self.delivered = Counter("proctor_dispatch_delivered_total", "Envelopes delivered", ["lane"], registry=r)
        self.failed = Counter("proctor_dispatch_failed_attempts_total", "Failed send attempts", ["lane"], registry=r)
        self.retries = Counter("proctor_dispatch_retries_total", "Retries scheduled", ["lane"], registry=r)
        self.dead = Counter("proctor_dispatch_dead_lettered_total", "Envelopes moved to the DLQ", ["lane"], registry=r)
        self.dlq_size = Gauge("proctor_dispatch_dlq_size", "Dead letters not replayed", registry=r)
        self.outbox_depth = Gauge(
            "proctor_dispatch_outbox_depth", "Envelopes the slowest lane has not delivered", registry=r
        )
        self.outbox_age = Gauge(
            "proctor_dispatch_outbox_age_seconds", "Age of the oldest undelivered envelope", registry=r
        )
        self.latency = Histogram(
            "proctor_dispatch_delivery_seconds",
            "From outbox append to acknowledged delivery",
            ["lane"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
