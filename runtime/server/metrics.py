"""Prometheus metrics (a private registry per server), every series labelled with model_name.

Where SGLang has a metric, it goes by SGLang's name (docs.sglang.io, "Production Metrics"), so
SGLang's Grafana dashboard works unchanged; what SGLang lacks is under `arborlm:`. Latencies are
observed in the HTTP process; queue and cache gauges are read from the scheduler at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, model_name: str):
        r = self.registry = CollectorRegistry()
        label = {"labelnames": ["model_name"], "registry": r}

        def hist(name, doc):
            return Histogram(name, doc, buckets=_LATENCY_BUCKETS, **label).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, **label).labels(model_name)

        self.ttft = hist("sglang:time_to_first_token_seconds", "Time to the first output token.")
        self.itl = hist("sglang:inter_token_latency_seconds", "Time between output chunks of a request, per token.")
        self.e2e = hist("sglang:e2e_request_latency_seconds", "Request latency, arrival to finish.")
        self.prompt_tokens = counter("sglang:prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("sglang:generation_tokens", "Generated tokens.")
        self.cached_tokens = counter("sglang:cached_tokens", "Prompt tokens served from the prefix cache.")
        self.num_requests = counter("sglang:num_requests", "Finished requests.")
        self.aborted = counter("sglang:num_aborted_requests", "Requests aborted (by the client, a deadline or a drain).")
        self._by_reason = Counter("arborlm:requests", "Finished requests by finish reason.",
                                  labelnames=["model_name", "finish_reason"], registry=r)
        self._rejected = Counter("arborlm:rejected_requests", "Requests refused before they started "
                                 "(queue_full: 429; shutting_down: 503).",
                                 labelnames=["model_name", "reason"], registry=r)
        self.model_name = model_name
        gauges = [
            ("sglang:num_running_reqs", "Requests in the running batch."),
            ("sglang:num_queue_reqs", "Requests waiting in the scheduler's queue."),
            ("sglang:num_used_tokens", "KV slots held by running requests."),
            ("sglang:token_usage", "Share of KV slots held by running requests."),
            ("sglang:cache_hit_rate", "Share of prompt tokens served from the prefix cache."),
            ("sglang:gen_throughput", "Generated tokens per second over the last 10 s."),
            ("arborlm:num_queued_reqs", "Requests admitted by the HTTP server and waiting for their first "
                                        "token (bounded by --max-queued-requests)."),
            ("arborlm:kv_pool_size", "KV slots in the pool."),
            ("arborlm:kv_free_slots", "Free KV slots."),
            ("arborlm:kv_cached_tokens", "KV slots held by the prefix cache and evictable."),
        ]
        self.gauges = {name.split(":")[1]: Gauge(name, doc, **label).labels(model_name) for name, doc in gauges}

    def finished(self, reason: str) -> None:
        self.num_requests.inc()
        self._by_reason.labels(self.model_name, reason).inc()
        if reason == "abort":
            self.aborted.inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self.model_name, reason).inc()

    def observe_stats(self, s: dict, queued: int) -> None:
        g = self.gauges
        g["num_running_reqs"].set(s["running_requests"])
        g["num_queue_reqs"].set(s["waiting_requests"])
        used = s["pool_size"] - s["free_slots"] - s["evictable_tokens"]
        g["num_used_tokens"].set(used)
        g["token_usage"].set(used / s["pool_size"])
        g["cache_hit_rate"].set(s["cache_hit_rate"])
        g["gen_throughput"].set(s["gen_throughput"])
        g["num_queued_reqs"].set(queued)
        g["kv_pool_size"].set(s["pool_size"])
        g["kv_free_slots"].set(s["free_slots"])
        g["kv_cached_tokens"].set(s["evictable_tokens"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
