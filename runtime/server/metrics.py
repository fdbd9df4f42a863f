"""Prometheus metrics (a private registry per server): request latencies observed in the HTTP
process, queue and cache gauges read from the scheduler at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("arborlm:time_to_first_token_seconds", "Time to the first output token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("arborlm:inter_token_latency_seconds", "Time between output chunks of a request, per token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("arborlm:e2e_request_latency_seconds", "Request latency, arrival to finish.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("arborlm:prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("arborlm:generation_tokens", "Generated tokens.", registry=r)
        self.cached_tokens = Counter("arborlm:cached_tokens", "Prompt tokens served from the prefix cache.", registry=r)
        self.requests = Counter("arborlm:requests", "Finished requests.", ["finish_reason"], registry=r)
        self.gauges = {
            name: Gauge(f"arborlm:{name}", doc, registry=r)
            for name, doc in [
                ("num_running_reqs", "Requests in the running batch."),
                ("num_waiting_reqs", "Requests waiting for admission."),
                ("token_usage", "Share of KV slots held by running requests."),
                ("cache_hit_rate", "Share of prompt tokens served from the prefix cache."),
                ("gen_throughput", "Generated tokens per second over the last 10 s."),
                ("kv_pool_size", "KV slots in the pool."),
                ("kv_free_slots", "Free KV slots."),
                ("kv_cached_tokens", "KV slots held by the prefix cache and evictable."),
            ]
        }

    def observe_stats(self, s: dict) -> None:
        g = self.gauges
        g["num_running_reqs"].set(s["running_requests"])
        g["num_waiting_reqs"].set(s["waiting_requests"])
        used = s["pool_size"] - s["free_slots"] - s["evictable_tokens"]
        g["token_usage"].set(used / s["pool_size"])
        g["cache_hit_rate"].set(s["cache_hit_rate"])
        g["gen_throughput"].set(s["gen_throughput"])
        g["kv_pool_size"].set(s["pool_size"])
        g["kv_free_slots"].set(s["free_slots"])
        g["kv_cached_tokens"].set(s["evictable_tokens"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
