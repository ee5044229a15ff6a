"""mesh.yaml: the topology and limits of one mesh, parsed once into frozen dataclasses.

Every field has a default that suits the tiny model on one laptop; a port of 0
means "pick a free one at start". `llmesh config show` prints the effective
config with defaults filled in.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmesh.services.common.sampling_params import MAX_SPECULATIVE_TOKENS


@dataclass(frozen=True)
class EngineLimits:
    block_size: int = 16
    num_kv_blocks: int = 0  # 0 = a share of the memory available to the executors (CPU)
    kv_memory_share: float = 0.5  # of the available memory, split among the executors
    max_model_len: int = 0  # 0 = the model's max_position_embeddings
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    enable_prefix_caching: bool = True
    dtype: str = "float32"
    device: str = "cpu"
    # a bfloat16 or float32 model's decode steps of a few sequences on a CPU in one
    # compiled kernel call (services/executor/cpu_decode_step.py); false: the eager forward
    cpu_decode_kernel: bool = True
    pipeline_depth: int = 2  # steps sent to the executors ahead of their results; 1 = serial
    step_timeout_s: float = 30.0  # a step without a result this long: the executor is hung
    probe_interval_s: float = 30.0  # known-answer probes (0 = none)
    probe_timeout_s: float = 10.0  # a probe answered later than this fails
    # graceful stop / restart (SIGTERM, a leak): running requests get this long to finish
    drain_timeout_s: float = 120.0
    # leak watchdog (0 = off): KV blocks allocated while idle for leak_idle_s, or a
    # process's RSS over (1 + leak_rss_growth) x its baseline (and + leak_rss_floor_mb),
    # the baseline taken after leak_warmup_s: drain, then a graceful restart
    leak_check_s: float = 10.0
    leak_idle_s: float = 30.0
    leak_rss_growth: float = 0.5
    leak_rss_floor_mb: float = 256.0
    leak_warmup_s: float = 60.0
    test_corrupt_after_steps: int = 0  # tests only: executors answer wrong after this many steps
    test_leak_mb_per_step: float = 0.0  # tests only: executors keep this much memory per step
    test_leak_kv_blocks: int = 0  # tests only: the scheduler loses this many KV blocks when idle
    bench_step_ms: float = 0.0  # benchmark only: executors sleep this long per step, no model
    # speculative decoding (prompt lookup): draft tokens a step by default (0 = off; a
    # request's `speculative_tokens` wins), drafted from the longest repeated suffix
    # of ngram_max down to ngram_min tokens (services/scheduler/speculation.py)
    speculative_tokens: int = 0
    speculative_ngram_max: int = 4
    speculative_ngram_min: int = 2


@dataclass(frozen=True)
class RoutingConfig:
    max_migrations: int = 3  # moves of one request to another replica when its own is lost
    replica_wait_s: float = 30.0  # how long a request waits for a ready replica in recovery
    # a scheduler reports its load ten times a second: one silent this long is hung (a
    # stopped process, a cut link) and lost; its requests move to another replica
    replica_silence_s: float = 5.0
    # warm standby: the last N replicas are loaded and probed but take requests only
    # while some other replica is not ready (down, hung, ejected)
    standby_replicas: int = 0
    test_failing_router: int = -1  # tests only: this router fails every request, SERVING
    # tests only: this replica's scheduler fails every other request it is sent (as a
    # replica that lost them) until a SIGUSR2
    test_half_failing_replica: int = -1
    # replica choice (services/router/core.py): kv_aware (prefix hits within a load
    # bound), least_loaded or round_robin
    policy: str = "kv_aware"
    prefix_load_bound: float = 4.0  # requests a cached prefix may pull above the least load
    prefix_load_ratio: float = 1.5  # ... or this ratio of it, if more


@dataclass(frozen=True)
class AutoscalerConfig:
    """mesh/autoscaler.py: replicas follow the load between min and max."""

    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 4
    warm_pool: int = 0  # replicas loaded and SERVING but given no traffic: join in < 1 s
    tick_s: float = 1.0  # how often the signals are read and a decision made
    ttft_pressure: float = 0.5  # scale out when a class's predicted TTFT reaches this share of its budget
    kv_high: float = 0.85  # ... or a replica's KV usage this share
    target_utilisation: float = 0.75  # ... or this share of the slots runs while arrivals rise or requests wait
    scale_in_utilisation: float = 0.3  # scale in below this (and still below target one replica fewer) ...
    scale_in_after_s: float = 30.0  # ... held this long (hysteresis)
    cooldown_s: float = 5.0  # between two changes
    record_signals: bool = False  # every tick's signals to autoscaler-signals.jsonl (traces)


@dataclass(frozen=True)
class ReplicaPorts:
    scheduler: int = 0
    executors: tuple[int, ...] = (0,)  # one per tensor-parallel rank, rank 0 first
    dist_port: int = 0  # the ranks' process-group rendezvous (rank 0 hosts it)
    # its number (replica-N; its processes scheduler-N, executor-N-K): its place in the
    # list at start, kept when replicas come and go (`llmesh scale`); -1 = its place
    index: int = -1


@dataclass(frozen=True)
class EnvoyConfig:
    port: int = 8080
    admin_port: int = 9901
    stream_idle_timeout_s: float = 300.0
    # retries of a request no router has started answering (connect failure, refused
    # stream, reset, UNAVAILABLE), with a jittered backoff from retry_backoff_base_s
    # doubling up to retry_backoff_max_s: together about 4 s on average (8 s at most), which
    # spans a router's restart; they end when the client gives up (its deadline)
    max_retries: int = 10
    retry_backoff_base_s: float = 0.1
    retry_backoff_max_s: float = 1.0
    # at most this share of the requests in flight may be retries at once (at least
    # 32): a dead fleet is not hammered by every client's retries
    retry_budget_percent: float = 50.0
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    # the routers' clusters and endpoints come over ADS from the control plane
    # (mesh/xds.py), so routers can come and go with no Envoy restart; false: all
    # in Envoy's static bootstrap file
    xds: bool = True
    xds_port: int = 0
    # TLS on the public port (mesh/tls.py): a PEM certificate and key, or (with
    # neither named) a self-signed pair `llmesh up` makes for localhost
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_self_signed: bool = False
    # mutual TLS between Envoy and the routers (mesh/tls.py): `llmesh up` makes a
    # private CA under the run directory (its path lands in upstream_mtls_dir), and
    # the routers' ports take TLS connections with a certificate of that CA only
    upstream_mtls: bool = False
    upstream_mtls_dir: str = ""
    # the gateway's own limit (0 = none): requests beyond this rate are refused by
    # Envoy at once (RESOURCE_EXHAUSTED / 429 with a retry hint), before any router;
    # a burst of up to rate_limit_burst (0 = one second's worth) passes
    max_requests_per_s: float = 0.0
    rate_limit_burst: int = 0


TRACING_MODES = ("file", "otlp", "off")
ROUTING_POLICIES = ("kv_aware", "least_loaded", "round_robin")  # services/router/core.py


@dataclass(frozen=True)
class ObservabilityConfig:
    # file: every service and Envoy export OTLP to a local collector process that
    # writes run_dir/traces.jsonl (read by `llmesh trace`); otlp: straight to
    # otlp_endpoint (a collector, Jaeger); off: no tracing at all.
    tracing: str = "file"
    otlp_endpoint: str = ""  # host:port of an OTLP/gRPC receiver (tracing: otlp)
    sample_ratio: float = 1.0  # share of new traces sampled; a client's sampled flag is kept
    # engine steps that only decode get a step span every this many steps (1 = all);
    # steps that compute prompt tokens always get one
    decode_step_every: int = 8
    collector_port: int = 0  # the local collector (tracing: file)
    metrics: bool = True  # Prometheus /metrics on every service
    metrics_ports: dict = dataclasses.field(default_factory=dict)  # service name -> port


LIMIT_STATES = ("memory", "redis")


@dataclass(frozen=True)
class AdmissionConfig:
    """Tenants, priorities and limits. Defaults suit the tiny model on one machine."""

    keys_file: str = ""  # YAML of tenants with hashed API keys; "" = open (anonymous)
    priorities: bool = True  # False: FCFS across classes and tenants
    # per class: weight, max_queued_requests, max_queued_tokens, timeout_s (default
    # server-side deadline), ttft_budget_s (refuse what would wait longer; 0 = off);
    # overrides of services.scheduler.policy's defaults
    classes: dict = dataclasses.field(default_factory=dict)
    aging_steps: int = 256  # a waiting request gains one class weight per this many steps
    kv_watermark: float = 0.1  # share of KV blocks new requests leave for running ones
    max_prompt_tokens: int = 0  # per-request caps for everyone; 0 = the model's limit
    max_output_tokens: int = 0
    state: str = "memory"  # where quotas and rate limits live: memory (one router) | redis
    redis_url: str = ""  # redis://host:port/db with state: redis
    share_prefix_cache: bool = False  # True: cached prefixes are shared across tenants


MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass(frozen=True)
class ServedModel:
    """One more model behind the gateway (`models:`), beside the top-level one: its
    own tokenizers and replicas (each with its own executors), routed to by the
    request's `model`. `engine`: the top-level engine section with this model's
    overrides on top."""

    name: str
    model: str = ""  # as the top-level `model` (a directory, a .gguf, tiny or bench)
    replicas: int = 1
    tensor_parallel: int = 1
    tokenizers: int = 1
    engine: EngineLimits = EngineLimits()
    tokenizer_ports: tuple[int, ...] = ()
    replica_ports: tuple[ReplicaPorts, ...] = ()
    autoscaler: AutoscalerConfig = AutoscalerConfig()  # this model's own (off by default)

    @property
    def slug(self) -> str:
        """The name as it goes into process and file names."""
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)


@dataclass(frozen=True)
class MeshConfig:
    model: str = ""  # a Hugging Face directory, a .gguf, tiny or bench; "" = SmolLM2-135M-Instruct
    model_name: str = "default"
    replicas: int = 1
    routers: int = 1
    tokenizers: int = 1
    http_api: bool = True  # each router also serves the OpenAI-compatible HTTP API
    tensor_parallel: int = 1
    engine: EngineLimits = EngineLimits()
    envoy: EnvoyConfig = EnvoyConfig()
    router_ports: tuple[int, ...] = ()
    tokenizer_ports: tuple[int, ...] = ()
    http_ports: tuple[int, ...] = ()  # one per router (its HTTP API)
    replica_ports: tuple[ReplicaPorts, ...] = ()
    kvcache_port: int = 0  # the prefix index of every replica (one service for the mesh)
    max_message_bytes: int = 4 * 2**20
    run_dir: str = ""  # logs and state; "" = ~/.cache/llmesh/run
    executor_threads: int = 0
    observability: ObservabilityConfig = ObservabilityConfig()
    admission: AdmissionConfig = AdmissionConfig()
    routing: RoutingConfig = RoutingConfig()
    autoscaler: AutoscalerConfig = AutoscalerConfig()
    # more models behind the same gateway, routed by the request's `model`
    models: tuple[ServedModel, ...] = ()

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def served(self) -> tuple["MeshConfig", ...]:
        """One config per served model, the top-level model first: this mesh with
        that model's name, directory, replicas, TP, engine and autoscaler (what the
        processes of one model are started from, and how it scales). The extra
        models have no standbys (those are the top-level model's); every executor
        of the mesh takes an equal share of `kv_memory_share`."""
        executors = self.replicas * self.tensor_parallel + sum(
            m.replicas * m.tensor_parallel for m in self.models)
        views = [dataclasses.replace(
            self, models=(), engine=_share(self.engine, self.replicas * self.tensor_parallel,
                                           executors))]
        for m in self.models:
            views.append(dataclasses.replace(
                self, model=m.model, model_name=m.name, replicas=m.replicas,
                tensor_parallel=m.tensor_parallel, tokenizers=m.tokenizers,
                engine=_share(m.engine, m.replicas * m.tensor_parallel, executors),
                tokenizer_ports=m.tokenizer_ports, replica_ports=m.replica_ports, models=(),
                routing=dataclasses.replace(self.routing, standby_replicas=0,
                                            test_half_failing_replica=-1),
                autoscaler=m.autoscaler))
        return tuple(views)


def _share(engine: EngineLimits, own: int, total: int) -> EngineLimits:
    return dataclasses.replace(engine, kv_memory_share=engine.kv_memory_share * own / total)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


class ConfigError(ValueError):
    pass


def load_config(path: str | Path | None) -> MeshConfig:
    raw = yaml.safe_load(Path(path).read_text()) if path else {}
    raw = raw or {}
    keys_file = (raw.get("admission") or {}).get("keys_file")
    if path and keys_file and not Path(keys_file).is_absolute():
        # a keys file named relative to mesh.yaml
        raw = dict(raw, admission=dict(raw["admission"],
                                       keys_file=str(Path(path).parent / keys_file)))
    return parse_config(raw)


def parse_config(raw: dict) -> MeshConfig:
    known = {f.name for f in dataclasses.fields(MeshConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown mesh.yaml keys: {', '.join(sorted(unknown))}")
    kw = dict(raw)
    kw["engine"] = _sub(EngineLimits, raw.get("engine"), "engine")
    kw["envoy"] = _sub(EnvoyConfig, raw.get("envoy"), "envoy")
    kw["observability"] = _sub(ObservabilityConfig, raw.get("observability"), "observability")
    kw["admission"] = _sub(AdmissionConfig, raw.get("admission"), "admission")
    kw["routing"] = _sub(RoutingConfig, raw.get("routing"), "routing")
    kw["autoscaler"] = _sub(AutoscalerConfig, raw.get("autoscaler"), "autoscaler")
    kw["router_ports"] = tuple(raw.get("router_ports", ()))
    kw["tokenizer_ports"] = tuple(raw.get("tokenizer_ports", ()))
    kw["http_ports"] = tuple(raw.get("http_ports", ()))
    kw["replica_ports"] = tuple(
        ReplicaPorts(scheduler=r.get("scheduler", 0),
                     executors=tuple(r.get("executors", (0,) * raw.get("tensor_parallel", 1))),
                     dist_port=r.get("dist_port", 0), index=r.get("index", -1))
        for r in raw.get("replica_ports", ()))
    kw["models"] = tuple(_served_model(m, i, kw["engine"]) for i, m in
                         enumerate(raw.get("models") or ()))
    cfg = MeshConfig(**kw)
    for name in ("replicas", "routers", "tokenizers", "tensor_parallel"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1")
    if cfg.http_ports and len(cfg.http_ports) != cfg.routers:
        raise ConfigError(f"http_ports lists {len(cfg.http_ports)} ports; one per router "
                          f"({cfg.routers})")
    obs = cfg.observability
    if obs.tracing not in TRACING_MODES:
        raise ConfigError(f"observability.tracing must be one of {', '.join(TRACING_MODES)}")
    if obs.tracing == "otlp" and not obs.otlp_endpoint:
        raise ConfigError("observability.otlp_endpoint (host:port) is required with tracing: otlp")
    if obs.decode_step_every < 1:
        raise ConfigError("observability.decode_step_every must be at least 1")
    if not 0.0 <= obs.sample_ratio <= 1.0:
        raise ConfigError("observability.sample_ratio must be within [0, 1]")
    _check_admission(cfg.admission)
    _check_engine(cfg.engine)
    e = cfg.envoy
    if e.max_requests_per_s < 0 or e.rate_limit_burst < 0:
        raise ConfigError("envoy.max_requests_per_s and rate_limit_burst must be >= 0")
    if bool(e.tls_cert_file) != bool(e.tls_key_file):
        raise ConfigError("envoy.tls_cert_file and envoy.tls_key_file go together")
    if not 0 <= cfg.routing.standby_replicas < cfg.replicas:
        raise ConfigError(f"routing.standby_replicas must be at least 0 and fewer than the "
                          f"{cfg.replicas} replicas")
    if cfg.routing.policy not in ROUTING_POLICIES:
        raise ConfigError(f"routing.policy must be one of {', '.join(ROUTING_POLICIES)}")
    if cfg.routing.prefix_load_bound < 0 or cfg.routing.prefix_load_ratio < 1:
        raise ConfigError("routing.prefix_load_bound must be >= 0 and prefix_load_ratio >= 1")
    _check_autoscaler(cfg.autoscaler, "autoscaler")
    for view in cfg.served():
        where = "" if view.model_name == cfg.model_name else f"models[{view.model_name}]."
        for i, r in enumerate(view.replica_ports):
            if len(r.executors) != view.tensor_parallel:
                raise ConfigError(f"{where}replica_ports[{i}].executors lists "
                                  f"{len(r.executors)} ports; tensor_parallel is "
                                  f"{view.tensor_parallel}")
    _check_models(cfg)
    return cfg


MODEL_FIELDS = {f.name for f in dataclasses.fields(ServedModel)}


def _served_model(raw, i: int, engine: EngineLimits) -> ServedModel:
    if not isinstance(raw, dict) or not raw.get("name"):
        raise ConfigError(f"models[{i}]: a mapping with a name (and model, replicas, "
                          "tensor_parallel, tokenizers, engine)")
    unknown = set(raw) - MODEL_FIELDS
    if unknown:
        raise ConfigError(f"models[{i}]: unknown keys {', '.join(sorted(unknown))}")
    kw = dict(raw, name=str(raw["name"]))
    overrides = raw.get("engine") or {}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(EngineLimits)}
    if unknown:
        raise ConfigError(f"models[{i}].engine: unknown keys {', '.join(sorted(unknown))}")
    kw["engine"] = dataclasses.replace(engine, **overrides)
    kw["autoscaler"] = _sub(AutoscalerConfig, raw.get("autoscaler"), f"models[{i}].autoscaler")
    tp = raw.get("tensor_parallel", 1)
    kw["tokenizer_ports"] = tuple(raw.get("tokenizer_ports", ()))
    kw["replica_ports"] = tuple(
        ReplicaPorts(scheduler=r.get("scheduler", 0), executors=tuple(r.get("executors", (0,) * tp)),
                     dist_port=r.get("dist_port", 0), index=r.get("index", -1))
        for r in raw.get("replica_ports", ()))
    return ServedModel(**kw)


def _check_models(cfg: MeshConfig) -> None:
    names = [cfg.model_name] + [m.name for m in cfg.models]
    for name in names:
        if not MODEL_NAME.match(name):
            raise ConfigError(f"model name {name!r}: letters, digits and ._:/- (128 at most), "
                              "starting with a letter or digit")
    if len(set(names)) != len(names):
        raise ConfigError(f"model names must differ: {', '.join(names)}")
    slugs = [m.slug for m in cfg.models]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(f"models: names that differ only in / or : ({', '.join(names)})")
    for m in cfg.models:
        for name in ("replicas", "tokenizers", "tensor_parallel"):
            if getattr(m, name) < 1:
                raise ConfigError(f"models[{m.name}].{name} must be at least 1")
        _check_engine(m.engine)
        _check_autoscaler(m.autoscaler, f"models[{m.name}].autoscaler")


def _check_autoscaler(a: AutoscalerConfig, where: str) -> None:
    if a.enabled and not 1 <= a.min_replicas <= a.max_replicas:
        raise ConfigError(f"{where}: need 1 <= min_replicas <= max_replicas")
    if a.warm_pool < 0 or a.tick_s <= 0:
        raise ConfigError(f"{where}: warm_pool must be >= 0 and tick_s > 0")


CLASS_FIELDS = {"weight", "max_queued_requests", "max_queued_tokens", "timeout_s", "ttft_budget_s"}


ENGINE_DTYPES = ("float32", "bfloat16", "float16", "auto", "int8", "float16-weights")


def _check_engine(e: EngineLimits) -> None:
    if e.dtype not in ENGINE_DTYPES:
        raise ConfigError(f"engine.dtype must be one of {', '.join(ENGINE_DTYPES)}")
    timings = ("drain_timeout_s", "leak_check_s", "leak_idle_s", "leak_rss_growth",
               "leak_rss_floor_mb", "leak_warmup_s")
    for name in timings:
        if getattr(e, name) < 0:
            raise ConfigError(f"engine.{name} must be >= 0")
    if e.num_kv_blocks < 0:
        raise ConfigError("engine.num_kv_blocks must be >= 0 (0 = sized from memory)")
    if not 0.0 < e.kv_memory_share <= 0.95:
        raise ConfigError("engine.kv_memory_share must be within (0, 0.95]")
    if not 0 <= e.speculative_tokens <= MAX_SPECULATIVE_TOKENS:
        raise ConfigError(f"engine.speculative_tokens must be within [0, "
                          f"{MAX_SPECULATIVE_TOKENS}]")
    if not 1 <= e.speculative_ngram_min <= e.speculative_ngram_max:
        raise ConfigError("engine: need 1 <= speculative_ngram_min <= speculative_ngram_max")
    if not e.num_kv_blocks and e.device != "cpu":
        raise ConfigError(f"engine.num_kv_blocks: set it for device {e.device!r} (sizing "
                          "from memory is for CPU executors)")


def _check_admission(adm: AdmissionConfig) -> None:
    if adm.state not in LIMIT_STATES:
        raise ConfigError(f"admission.state must be one of {', '.join(LIMIT_STATES)}")
    if adm.state == "redis" and not adm.redis_url:
        raise ConfigError("admission.redis_url (redis://host:port/db) is required with state: redis")
    if not 0.0 <= adm.kv_watermark < 1.0:
        raise ConfigError("admission.kv_watermark must be within [0, 1)")
    if adm.aging_steps < 1:
        raise ConfigError("admission.aging_steps must be at least 1")
    if adm.max_prompt_tokens < 0 or adm.max_output_tokens < 0:
        raise ConfigError("admission.max_prompt_tokens and max_output_tokens must be >= 0")
    for name, cls in adm.classes.items():
        if name not in ("interactive", "standard", "batch"):
            raise ConfigError(f"admission.classes: unknown class {name!r} "
                              "(interactive, standard, batch)")
        unknown = set(cls or {}) - CLASS_FIELDS
        if unknown:
            raise ConfigError(f"admission.classes.{name}: unknown keys {', '.join(sorted(unknown))}")
        for key, value in (cls or {}).items():
            if not isinstance(value, (int, float)) or value < 0 or (key == "weight" and value <= 0):
                raise ConfigError(f"admission.classes.{name}.{key} must be a positive number")
    if adm.keys_file and not Path(adm.keys_file).is_file():
        raise ConfigError(f"admission.keys_file: {adm.keys_file} is not a file")


def _sub(cls, raw, name):
    raw = raw or {}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown {name} keys: {', '.join(sorted(unknown))}")
    return cls(**raw)
