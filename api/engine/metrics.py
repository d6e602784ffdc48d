"""Engine metrics, named after vLLM's so existing dashboards read them.

They live in the engine's own registry (not the process-global one), so several
apps in one process (tests, benchmarks) never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class EngineMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.running = Gauge("thai:num_requests_running", "Requests in the running batch.",
                             labels, registry=r).labels(model_name)
        self.waiting = Gauge("thai:num_requests_waiting", "Requests waiting for a batch slot.",
                             labels, registry=r).labels(model_name)
        self.ttft = Histogram("thai:time_to_first_token_seconds", "Time to first token.",
                              labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("thai:inter_token_latency_seconds", "Time between output tokens.",
                             labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.queue_time = Histogram("thai:request_queue_time_seconds", "Time waiting for a slot.",
                                    labels, buckets=_REQUEST_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("thai:e2e_request_latency_seconds", "Arrival to last token.",
                             labels, buckets=_REQUEST_BUCKETS, registry=r).labels(model_name)
        self.batch_size = Histogram("thai:batch_size", "Sequences per decode step.", labels,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r).labels(model_name)
        self.generation_tokens = Counter("thai:generation_tokens", "Generated tokens.",
                                         labels, registry=r).labels(model_name)
        self.prompt_tokens = Counter("thai:prompt_tokens", "Prefilled prompt tokens.",
                                     labels, registry=r).labels(model_name)
        self._finished = Counter("thai:request_success", "Finished requests by reason.",
                                 labels + ["finished_reason"], registry=r)
        self._model = model_name

    def finished(self, reason: str) -> None:
        self._finished.labels(self._model, reason).inc()
