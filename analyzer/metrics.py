"""Prometheus metrics of one analyzer app (own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.frames = Counter(
            "proctor_frames_total", "Video frames by outcome", ["outcome"], registry=r
        )  # received, analysed, dropped, sampled_out, rejected
        self.audio_chunks = Counter("proctor_audio_chunks_total", "Audio chunks by outcome", ["outcome"], registry=r)
        self.audio_seconds = Counter("proctor_audio_seconds_total", "Seconds of audio received", registry=r)
        self.inference_latency = Histogram(
            "proctor_inference_seconds",
            "Inference latency per model",
            ["model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.frame_to_signal = Histogram(
            "proctor_frame_pipeline_seconds",
            "From frame arrival to rule evaluation",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.queue_depth = Gauge("proctor_queue_depth", "Items waiting", ["queue"], registry=r)
        self.alerts = Counter(
            "proctor_alerts_total", "Alerts emitted by type and incident state", ["type", "state"], registry=r
        )
        self.active_sessions = Gauge("proctor_active_sessions", "Sessions in state active", registry=r)
        self.connected_streams = Gauge("proctor_connected_streams", "Open media WebSockets", registry=r)
        self.worker_errors = Counter(
            "proctor_worker_errors_total", "Exceptions in session workers (logged; the worker restarted)", ["worker"],
            registry=r,
        )  # fmt: skip
        self.incidents_suppressed = Counter(
            "proctor_incidents_suppressed_total", "Incidents over the per-session rate limit", ["type"], registry=r
        )
        self.outbox_errors = Counter("proctor_outbox_errors_total", "Failed outbox appends", registry=r)
        self.expiry_sweeps = Counter(
            "proctor_expiry_sweeps_total", "Expiry sweeps completed (every expiry_sweep_s)", registry=r
        )
        self.protocol_errors = Counter(
            "proctor_protocol_errors_total", "Rejected client messages", ["code"], registry=r
        )
