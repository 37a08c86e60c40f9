"""The numbers an operator of ``cheers serve`` watches, in Prometheus' text format at ``/metrics``.

Each app has its own registry, so two servers in one process (tests, the load benchmark) count
apart. Rates (requests, tokens and images per second) are ``rate()`` of the counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# seconds: from a token every few ms on a GPU to a queued request on a shared CPU
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    """Counters, gauges and histograms of one server; ``render()`` -> (body, content type)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("cheers_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.request_latency = Histogram("cheers_request_duration_seconds", "time to answer a request",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("cheers_queue_depth", "requests waiting for the model", registry=r)
        self.running = Gauge("cheers_requests_running", "requests decoding or sampling now", registry=r)
        self.cancelled = Counter("cheers_requests_cancelled", "requests whose client went away before the answer",
                                 registry=r)
        self.time_to_first_token = Histogram("cheers_time_to_first_token_seconds",
                                             "from a chat's arrival at the scheduler to its first token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("cheers_inter_token_latency_seconds",
                                             "between two tokens of one chat", buckets=LATENCY_BUCKETS, registry=r)
        self.sampler_batch = Histogram("cheers_sampler_batch_size", "images per sampler call (before CFG)",
                                       buckets=BATCH_BUCKETS, registry=r)
        self.tokens = Counter("cheers_generated_tokens", "chat tokens decoded", registry=r)
        self.images = Counter("cheers_generated_images", "images generated and sent", registry=r)

    def watch(self, load) -> None:
        """Read the queue gauges from ``load()`` (the scheduler's) at each scrape."""
        self.queue_depth.set_function(lambda: load()["waiting"])
        self.running.set_function(lambda: load()["decoding"] + load()["sampling"])

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
