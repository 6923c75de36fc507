"""The Prometheus metrics of one app, in its own registry (several apps in one process do not clash)."""

from __future__ import annotations

from medgpt.infer.base import Engine

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """Requests and errors by status, tokens, time to first token and per token, the engine's queue and batch."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("medgpt_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.errors = Counter("medgpt_errors", "HTTP requests answered with an error", ["status"], registry=r)
        self.prompt_tokens = Counter("medgpt_prompt_tokens", "prompt tokens of finished generations", registry=r)
        self.completion_tokens = Counter("medgpt_generation_tokens", "tokens generated", registry=r)
        Gauge("medgpt_queue_length", "requests submitted and not started", registry=r).set_function(engine.waiting)
        Gauge("medgpt_running_requests", "requests in the running batch", registry=r).set_function(engine.running)
        self.ttft = Histogram("medgpt_time_to_first_token_seconds", "time from submission to the first text",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("medgpt_time_per_output_token_seconds", "time per generated token after the first",
                              buckets=TOKEN_TIME_BUCKETS, registry=r)

    def answered(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(str(status)).inc()
