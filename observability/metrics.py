"""Prometheus metrics, by service. Names and labels are listed in docs/observability.md.

Request-level figures are taken where the client's stream is (the router);
engine state is read from the scheduler's loop at scrape time (a collector, so
the engine loop pays nothing for gauges). Labels are bounded enums only:
never a request id, API key, prompt or text (tenant names come from the keys
file, a bounded set).
"""
from __future__ import annotations

from functools import lru_cache

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.5, 0.75, 1.0, 2.0, 5.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class RouterMetrics:
    def __init__(self):
        # per served model (mesh.yaml's model names: a bounded set)
        self.requests = Counter("llmesh_requests", "Finished requests by finish reason and gRPC status",
                                ["model", "finish_reason", "status"])
        self.prompt_tokens = Counter("llmesh_prompt_tokens", "Prompt tokens of finished requests",
                                     ["model"])
        self.generation_tokens = Counter("llmesh_generation_tokens",
                                         "Output tokens returned to clients", ["model"])
        self.ttft = Histogram("llmesh_time_to_first_token_seconds",
                              "Request arrival at the router to its first token", ["model"],
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("llmesh_inter_token_latency_seconds",
                             "Gap between consecutive token chunks of a stream", ["model"],
                             buckets=ITL_BUCKETS)
        self.e2e = Histogram("llmesh_e2e_request_latency_seconds",
                             "Request arrival to its last token", ["model"], buckets=LATENCY_BUCKETS)
        self.queue = Histogram("llmesh_request_queue_time_seconds",
                               "Time a request waited in the scheduler before its first step",
                               ["model"], buckets=LATENCY_BUCKETS)
        self.in_flight = Gauge("llmesh_requests_in_flight", "Requests streaming through this router")
        # admission: reason is a fixed enum (unauthenticated, permission_denied, request_cap,
        # rate_limit_requests, rate_limit_tokens, quota_input_tokens, quota_output_tokens,
        # exceeds_rate_limit, queue_full, slo, deadline); tenant is a name from the keys file
        self.rejections = Counter("llmesh_admission_rejections",
                                  "Requests refused before any compute, by reason", ["reason"])
        self.tenant_tokens = Counter("llmesh_tenant_tokens",
                                     "Tokens served per tenant (prompt or output)", ["tenant", "kind"])
        self.migrations = Counter("llmesh_request_migrations",
                                  "Requests resubmitted after their replica was lost")
        self.tokenizer_retries = Counter("llmesh_tokenizer_retries",
                                         "Encode calls made again after the tokenizer failed them")
        self.standby_active = Gauge("llmesh_router_standby_active",
                                    "1 while the warm standby replicas take requests")
        self.breaker_open = Gauge("llmesh_router_breaker_open", "1 while a replica's circuit "
                                  "breaker keeps new requests away (open or half-open)",
                                  ["replica"])
        self.breaker_opened = Counter("llmesh_router_breaker_opened",
                                      "Times a replica's circuit breaker opened", ["replica"])


class SchedulerCollector:
    """Engine state read from the scheduler's loop when Prometheus scrapes."""

    def __init__(self, loop, prober=None):
        self.loop = loop
        self.prober = prober

    def collect(self):
        loop = self.loop
        kv = loop.kv.stats()
        sched = loop.scheduler
        s = loop.stats
        yield GaugeMetricFamily("llmesh_num_requests_running", "Sequences running", len(sched.running))
        yield GaugeMetricFamily("llmesh_num_requests_waiting", "Sequences waiting", len(sched.waiting))
        depth = GaugeMetricFamily("llmesh_queue_depth", "Sequences waiting, by priority class",
                                  labels=["class"])
        tokens = GaugeMetricFamily("llmesh_queue_tokens",
                                   "Tokens of the waiting sequences, by priority class",
                                   labels=["class"])
        for cls, n in sched.waiting.depth.items():
            depth.add_metric([cls], n)
            tokens.add_metric([cls], sched.waiting.queued_tokens.get(cls, 0))
        yield depth
        yield tokens
        yield CounterMetricFamily("llmesh_scheduler_rejections",
                                  "Requests refused by the scheduler: queue full",
                                  s.num_rejected)
        yield CounterMetricFamily("llmesh_scheduler_slo_rejections",
                                  "Requests refused because their predicted queue wait passed "
                                  "their class's TTFT budget", s.num_slo_rejected)
        yield GaugeMetricFamily("llmesh_queue_drain_tokens_per_second",
                                "Prompt tokens the replica admits per second while requests wait",
                                loop.waits.drain.tokens_per_s)
        yield CounterMetricFamily("llmesh_deadline_expired_in_queue",
                                  "Requests whose deadline passed while queued (never computed)",
                                  s.num_deadline_expired)
        yield GaugeMetricFamily("llmesh_kv_cache_usage_ratio", "Share of KV blocks in use", kv.usage)
        yield GaugeMetricFamily("llmesh_kv_cache_waste_ratio",
                                "Share of allocated KV slots holding no token", kv.waste)
        yield GaugeMetricFamily("llmesh_kv_cache_used_blocks", "KV blocks in use", kv.num_used_blocks)
        yield GaugeMetricFamily("llmesh_kv_cache_blocks", "KV blocks of the replica", kv.num_blocks)
        yield GaugeMetricFamily("llmesh_prefix_cache_hit_rate",
                                "Prompt tokens found in the prefix cache / prompt tokens looked up",
                                kv.prefix_hit_rate)
        yield CounterMetricFamily("llmesh_preemptions", "Sequences preempted (recompute)",
                                  sched.num_preemptions)
        yield CounterMetricFamily("llmesh_kv_resets",
                                  "Prefix cache dropped because the executors' KV was lost",
                                  s.num_kv_resets)
        yield CounterMetricFamily("llmesh_requeued_on_executor_failure",
                                  "Running sequences put back in the queue when the executor "
                                  "group failed, to be recomputed", s.num_requeued)
        yield CounterMetricFamily("llmesh_engine_steps", "Engine steps run", s.num_steps)
        spec = sched.speculator
        yield CounterMetricFamily("llmesh_spec_draft_tokens",
                                  "Speculative decoding: draft tokens sent to verify",
                                  spec.num_draft_tokens)
        yield CounterMetricFamily("llmesh_spec_accepted_tokens",
                                  "Speculative decoding: draft tokens kept (equal to what "
                                  "plain decoding sampled)", spec.num_accepted_tokens)
        if self.prober is not None:
            yield CounterMetricFamily("llmesh_probe_failures",
                                      "Known-answer probes answered wrong or late",
                                      self.prober.num_failures)
            yield GaugeMetricFamily("llmesh_replica_ejected",
                                    "1 while the last known-answer probe failed",
                                    1 if self.loop.state.is_ejected else 0)
        phases = CounterMetricFamily("llmesh_step_phase_seconds",
                                     "Time spent in each phase of the engine steps", labels=["phase"])
        for phase in ("schedule", "executor_rpc", "forward", "sample", "comm"):
            phases.add_metric([phase], getattr(s, f"{phase}_s"))
        yield phases


@lru_cache(maxsize=None)
def router_metrics() -> RouterMetrics:
    return RouterMetrics()


@lru_cache(maxsize=None)
def step_histogram() -> Histogram:
    return Histogram("llmesh_step_duration_seconds",
                     "One engine step: schedule, executor round trip, update", buckets=STEP_BUCKETS)


@lru_cache(maxsize=None)
def executor_metrics():
    return (Histogram("llmesh_executor_forward_seconds", "Model forward per step on this rank",
                      buckets=STEP_BUCKETS),
            Counter("llmesh_executor_collective_seconds",
                    "Time in tensor-parallel collectives on this rank"))


@lru_cache(maxsize=None)
def tokenizer_requests() -> Counter:
    return Counter("llmesh_tokenizer_requests", "Tokenizer calls by method", ["method"])


@lru_cache(maxsize=None)
def leak_restarts() -> Counter:
    return Counter("llmesh_leak_restarts", "Graceful restarts ordered by the leak watchdog, by "
                   "what leaked (kv, rss) and which process restarts", ["kind", "restart"])


def register_scheduler(loop, prober=None) -> None:
    REGISTRY.register(SchedulerCollector(loop, prober))


class KVCacheCollector:
    def __init__(self, index):
        self.index = index

    def collect(self):
        blocks = GaugeMetricFamily("llmesh_kvcache_index_blocks",
                                   "Cached blocks the prefix index holds, per replica",
                                   labels=["replica"])
        synced = GaugeMetricFamily("llmesh_kvcache_index_synced",
                                   "1 while the replica's index follows its pool, 0 while "
                                   "a resync is pending", labels=["replica"])
        snapshots = CounterMetricFamily("llmesh_kvcache_snapshots",
                                        "Snapshots loaded, per replica", labels=["replica"])
        for name, r in self.index.replicas.items():
            blocks.add_metric([name], len(r.blocks))
            synced.add_metric([name], 1 if r.is_synced else 0)
            snapshots.add_metric([name], r.num_snapshots)
        yield blocks
        yield synced
        yield snapshots


def register_kvcache(index) -> None:
    REGISTRY.register(KVCacheCollector(index))
