"""mesh.yaml: the topology and limits of one mesh, parsed once into frozen dataclasses.

Every field has a default that suits the tiny model on one laptop; a port of 0
means "pick a free one at start". `llmesh config show` prints the effective
config with defaults filled in.
"""
from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass
from pathlib import Path

import yaml


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

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


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
    if bool(e.tls_cert_file) != bool(e.tls_key_file):
        raise ConfigError("envoy.tls_cert_file and envoy.tls_key_file go together")
    if not 0 <= cfg.routing.standby_replicas < cfg.replicas:
        raise ConfigError(f"routing.standby_replicas must be at least 0 and fewer than the "
                          f"{cfg.replicas} replicas")
    if cfg.routing.policy not in ROUTING_POLICIES:
        raise ConfigError(f"routing.policy must be one of {', '.join(ROUTING_POLICIES)}")
    if cfg.routing.prefix_load_bound < 0 or cfg.routing.prefix_load_ratio < 1:
        raise ConfigError("routing.prefix_load_bound must be >= 0 and prefix_load_ratio >= 1")
    a = cfg.autoscaler
    if a.enabled and not 1 <= a.min_replicas <= a.max_replicas:
        raise ConfigError("autoscaler: need 1 <= min_replicas <= max_replicas")
    if a.warm_pool < 0 or a.tick_s <= 0:
        raise ConfigError("autoscaler: warm_pool must be >= 0 and tick_s > 0")
    for i, r in enumerate(cfg.replica_ports):
        if len(r.executors) != cfg.tensor_parallel:
            raise ConfigError(f"replica_ports[{i}].executors lists {len(r.executors)} ports; "
                              f"tensor_parallel is {cfg.tensor_parallel}")
    return cfg


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_process_names(ports: ReplicaPorts) -> list[str]:
    return [f"scheduler-{ports.index}"] + [f"executor-{ports.index}-{k}"
                                           for k in range(len(ports.executors))]


def resolve_ports(cfg: MeshConfig) -> MeshConfig:
    """Fill every port of 0 (or missing) with a free loopback port."""
    # ports the config names, so an automatic pick never lands on one of them
    taken: set[int] = {cfg.envoy.port, cfg.envoy.admin_port, cfg.envoy.xds_port,
                       cfg.observability.collector_port,
                       cfg.kvcache_port, *cfg.router_ports, *cfg.tokenizer_ports, *cfg.http_ports,
                       *cfg.observability.metrics_ports.values()} - {0}
    for r in cfg.replica_ports:
        taken |= {r.scheduler, r.dist_port, *r.executors} - {0}

    def pick(p: int) -> int:
        if p:
            return p
        # the kernel may hand the same free port out twice in a row: never reuse one
        while not p or p in taken:
            p = free_port()
        taken.add(p)
        return p

    routers = tuple(pick(p) for p in (cfg.router_ports or (0,) * cfg.routers))
    tokenizers = tuple(pick(p) for p in (cfg.tokenizer_ports or (0,) * cfg.tokenizers))
    http = tuple(pick(p) for p in (cfg.http_ports or (0,) * len(routers))) if cfg.http_api else ()
    tp = cfg.tensor_parallel
    replicas = list(cfg.replica_ports) + [ReplicaPorts(executors=(0,) * tp)] * (
        cfg.replicas - len(cfg.replica_ports))
    replicas = tuple(ReplicaPorts(pick(r.scheduler), tuple(pick(p) for p in r.executors),
                                  pick(r.dist_port) if tp > 1 else 0,
                                  r.index if r.index >= 0 else i)
                     for i, r in enumerate(replicas))
    envoy = dataclasses.replace(cfg.envoy, port=pick(cfg.envoy.port),
                                admin_port=pick(cfg.envoy.admin_port),
                                xds_port=pick(cfg.envoy.xds_port) if cfg.envoy.xds else 0)
    obs = cfg.observability
    metrics_ports = {}
    if obs.metrics:
        names = [f"router-{i}" for i in range(len(routers))]
        names += [f"tokenizer-{i}" for i in range(len(tokenizers))] + ["kvcache"]
        for ports in replicas:
            names += replica_process_names(ports)
        if cfg.autoscaler.enabled:
            names.append("autoscaler")  # (the supervisor's: its decisions)
        metrics_ports = {n: pick(obs.metrics_ports.get(n, 0)) for n in names}
    obs = dataclasses.replace(
        obs, metrics_ports=metrics_ports,
        collector_port=pick(obs.collector_port) if obs.tracing == "file" else 0)
    return dataclasses.replace(cfg, router_ports=routers, tokenizer_ports=tokenizers, http_ports=http,
                               replica_ports=replicas, kvcache_port=pick(cfg.kvcache_port),
                               envoy=envoy, observability=obs)
