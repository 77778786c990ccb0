"""Prometheus metrics of the server (`GET /metrics`), in a registry of their own per app."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class Metrics:
    """Counters, gauges and histograms; the engine and the routes update them."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "loramix_requests",
            "HTTP API requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("loramix_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("loramix_generated_tokens", "tokens generated", registry=r)
        self.batch_size = Histogram(
            "loramix_batch_size", "sequences per decode step", buckets=BATCH_BUCKETS, registry=r
        )
        self.forward_seconds = Counter(
            "loramix_forward_seconds",
            "engine time in forward calls, by phase (prefill or decode)",
            ["phase"],
            registry=r,
        )
        self.queue_length = Gauge("loramix_queue_length", "requests waiting for a slot", registry=r)
        self.running = Gauge("loramix_running_sequences", "sequences in the batch", registry=r)
        self.latency = Histogram(
            "loramix_request_latency_seconds",
            "time from a request's arrival to its last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "loramix_time_to_first_token_seconds",
            "time from a request's arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
