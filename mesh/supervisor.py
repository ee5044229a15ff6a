"""Local supervisor: starts every service as a process, in order, waits for each to
report SERVING, restarts crashed processes with backoff, stops them all by pid.

The process that holds a Supervisor (and scales the mesh) is mesh/foreground.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import llmesh
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.mesh.config import MeshConfig, ReplicaPorts, ServedModel
from llmesh.mesh.ports import tokenizer_process_name
from llmesh.mesh.envoy import envoy_binary, render_envoy_yaml, xds_clusters
from llmesh.services.common.mtls import MtlsFiles, channel_credentials
from llmesh.services.common.open_files import raise_open_files
from llmesh.services.router.replica_set import ReplicaEntry, write_replica_set

# the folder the llmesh package is imported from (the repository root in a checkout):
# children start there and find the same code
ROOT = Path(llmesh.__file__).resolve().parents[1]


@dataclass
class ProcSpec:
    name: str
    argv: list[str]
    health_port: int | None  # gRPC health; None = checked another way (Envoy)
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    log_path: Path | None = None
    extra: dict = field(default_factory=dict)
    group: str = ""  # processes that live and die together (a replica's TP ranks)
    # processes that start side by side: those of one stage are all started when the
    # first of them is reached in the start order, then all waited for (each needs
    # only what earlier stages started)
    stage: str = ""
    env: dict = field(default_factory=dict)  # added to the process environment


def is_serving(port: int, timeout: float = 1.0, mtls_dir: str = "") -> bool:
    """The gRPC health check of the service on `port`; `mtls_dir`: over mutual TLS
    (a router of a mesh with `envoy.upstream_mtls`, services/common/mtls.py)."""
    target = f"127.0.0.1:{port}"
    try:
        with (grpc.secure_channel(target, channel_credentials(MtlsFiles(Path(mtls_dir))))
              if mtls_dir else grpc.insecure_channel(target)) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=timeout)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def envoy_ready(admin_port: int, clusters: tuple[str, ...] = ("routers",)) -> bool:
    """Envoy is live and sees at least one healthy endpoint in each of `clusters`."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=1) as r:
            lines = r.read().decode().splitlines()
        return all(any(line.startswith(f"{c}::") and line.endswith("health_flags::healthy")
                       for line in lines) for c in clusters)
    except OSError:
        return False


def telemetry_env(cfg: MeshConfig) -> dict:
    obs = cfg.observability
    if obs.tracing == "off":
        return {"LLMESH_TRACING": "off"}
    endpoint = obs.otlp_endpoint if obs.tracing == "otlp" else f"127.0.0.1:{obs.collector_port}"
    return {"LLMESH_TRACING": "otlp", "LLMESH_OTLP_ENDPOINT": endpoint,
            "LLMESH_TRACE_SAMPLE": str(obs.sample_ratio),
            "LLMESH_DECODE_STEP_EVERY": str(obs.decode_step_every)}


def kv_blocks_args(cfg: MeshConfig) -> list[str]:
    """The executors' KV arguments. With num_kv_blocks 0 each executor takes its share
    of the memory available once it has loaded, at most what max_num_seqs sequences
    of max_model_len can fill; the scheduler starts with that cap and shrinks to the
    smallest rank's count when they connect."""
    e = cfg.engine
    if e.num_kv_blocks:
        return ["--num-kv-blocks", str(e.num_kv_blocks)]
    processes = cfg.replicas * cfg.tensor_parallel
    return ["--num-kv-blocks", "0", "--max-num-seqs", str(e.max_num_seqs),
            "--max-model-len", str(e.max_model_len),
            "--kv-memory-share", f"{e.kv_memory_share / processes:.6f}"]


# The start stages (ProcSpec.stage): what needs nothing else up (tokenizers, the KV
# cache index, every replica's executors, the xDS control plane), then every
# replica's scheduler (it connects to its executors and the KV cache index), then
# the routers (SERVING once they reach a scheduler); Envoy after them. The trace
# collector, when there is one, starts first on its own. (Executors that size their
# KV cache from the available memory start one replica at a time: replica_specs.)
STAGE_BACKENDS = "backends"
STAGE_SCHEDULERS = "schedulers"
STAGE_ROUTERS = "routers"

ROUTERS_FILE = "routers.json"
REPLICA_SET_FILE = "replicas.json"  # the routers' replicas (services/router/replica_set.py)


def write_routers(run_dir: Path, router_ports, http_ports=(), draining=()) -> None:
    """The routers the xDS control plane gives Envoy (it watches this file)."""
    tmp = run_dir / (ROUTERS_FILE + ".tmp")
    tmp.write_text(json.dumps({"routers": list(router_ports), "http": list(http_ports),
                               "draining": list(draining)}))
    os.replace(tmp, run_dir / ROUTERS_FILE)


def standby_names(cfg: MeshConfig) -> set[str]:
    """The warm standbys: the last `routing.standby_replicas` replicas at start."""
    n = cfg.routing.standby_replicas
    return {f"replica-{p.index}" for p in cfg.replica_ports[len(cfg.replica_ports) - n:]} \
        if n else set()


def replica_entries(cfg: MeshConfig, standby: set[str], draining=()) -> list[ReplicaEntry]:
    """The replica set of `cfg` for the routers; `draining`: names about to leave."""
    return [ReplicaEntry(f"replica-{p.index}", f"127.0.0.1:{p.scheduler}",
                         standby=f"replica-{p.index}" in standby,
                         draining=f"replica-{p.index}" in draining)
            for p in cfg.replica_ports]


def replica_specs(cfg: MeshConfig, ports: ReplicaPorts, model_dir: str) -> list[ProcSpec]:
    """One replica's processes, executors first (a scheduler serves once they do)."""
    py = [sys.executable, "-m"]
    e = cfg.engine
    r = ports.index
    specs = []
    tp = len(ports.executors)
    threads = cfg.executor_threads or (max(1, (os.cpu_count() or 1) // tp) if tp > 1 else 0)
    # The replicas start side by side, but not when each executor sizes its KV cache
    # from the memory it finds available: then one replica after the other, so that
    # each measures what the ones before it left.
    executors_stage, scheduler_stage = ((STAGE_BACKENDS, STAGE_SCHEDULERS) if e.num_kv_blocks
                                        else ("", ""))
    for rank, port in enumerate(ports.executors):
        dist = (["--rank", str(rank), "--world-size", str(tp),
                 "--dist-addr", f"127.0.0.1:{ports.dist_port}"] if tp > 1 else [])
        specs.append(ProcSpec(f"executor-{r}-{rank}", py + [
            "llmesh.services.executor", "--port", str(port), "--model", model_dir,
            "--dtype", e.dtype, "--device", e.device, *kv_blocks_args(cfg),
            "--block-size", str(e.block_size), "--threads", str(threads),
            "--bench-step-ms", str(e.bench_step_ms),
            "--test-corrupt-after-steps", str(e.test_corrupt_after_steps),
            "--test-leak-mb-per-step", str(e.test_leak_mb_per_step)]
            + ([] if e.cpu_decode_kernel else ["--no-cpu-decode-kernel"]) + dist, port,
            group=f"executors-{r}" if tp > 1 else "", stage=executors_stage))
    specs.append(ProcSpec(f"scheduler-{r}", py + [
        "llmesh.services.scheduler", "--port", str(ports.scheduler), "--model", model_dir,
        "--model-name", cfg.model_name, "--kvcache", f"127.0.0.1:{cfg.kvcache_port}",
        "--replica-name", f"replica-{r}",
        "--executors", ",".join(f"127.0.0.1:{p}" for p in ports.executors),
        "--num-kv-blocks", str(e.num_kv_blocks), "--block-size", str(e.block_size),
        "--max-model-len", str(e.max_model_len),
        "--max-num-batched-tokens", str(e.max_num_batched_tokens),
        "--max-num-seqs", str(e.max_num_seqs), "--pipeline-depth", str(e.pipeline_depth),
        "--step-timeout-s", str(e.step_timeout_s),
        "--probe-interval-s", str(e.probe_interval_s),
        "--probe-timeout-s", str(e.probe_timeout_s),
        "--drain-timeout-s", str(e.drain_timeout_s), "--leak-check-s", str(e.leak_check_s),
        "--leak-idle-s", str(e.leak_idle_s), "--leak-rss-growth", str(e.leak_rss_growth),
        "--leak-rss-floor-mb", str(e.leak_rss_floor_mb),
        "--leak-warmup-s", str(e.leak_warmup_s),
        "--test-leak-kv-blocks", str(e.test_leak_kv_blocks),
        "--speculative-tokens", str(e.speculative_tokens),
        "--speculative-ngram-max", str(e.speculative_ngram_max),
        "--speculative-ngram-min", str(e.speculative_ngram_min),
        "--admission", json.dumps(dataclasses.asdict(cfg.admission))]
        + ([] if e.enable_prefix_caching else ["--no-prefix-caching"])
        + (["--test-fail-half"] if ports.index == cfg.routing.test_half_failing_replica else []),
        ports.scheduler,
        stage=scheduler_stage))
    add_env(cfg, specs)
    return specs


def add_env(cfg: MeshConfig, specs: list[ProcSpec]) -> None:
    """Tracing and metrics settings, in each service's environment."""
    tel = telemetry_env(cfg)
    for spec in specs:
        if spec.name not in ("collector", "envoy"):
            spec.env.update(tel)
            if spec.name in cfg.observability.metrics_ports:
                spec.env["LLMESH_METRICS_PORT"] = str(cfg.observability.metrics_ports[spec.name])


def replica_set_file(run_dir: Path, cfg: MeshConfig, model: ServedModel | None) -> Path:
    """The replica set of the top-level model (None) or of one of `models:`."""
    return run_dir / (REPLICA_SET_FILE if model is None else f"replicas-{model.slug}.json")


def build_specs(cfg: MeshConfig, model_dir: str, run_dir: Path) -> list[ProcSpec]:
    """Every process of the mesh; `model_dir`: the top-level model's directory (those
    of `models:` are in their `model`, resolved by `llmesh up`)."""
    model_dirs = [model_dir] + [m.model for m in cfg.models]
    py = [sys.executable, "-m"]
    specs = []
    obs = cfg.observability
    if obs.tracing == "file":
        specs.append(ProcSpec("collector", py + [
            "llmesh.observability.collector", "--port", str(obs.collector_port),
            "--out", str(run_dir / "traces.jsonl")], obs.collector_port))
    views = cfg.served()
    for model, view, model_dir in zip((None,) + cfg.models, views, model_dirs):
        for i, port in enumerate(view.tokenizer_ports):
            specs.append(ProcSpec(tokenizer_process_name(model, i), py + [
                "llmesh.services.tokenizer", "--port", str(port), "--model", model_dir], port,
                stage=STAGE_BACKENDS))
        write_replica_set(replica_set_file(run_dir, cfg, model),
                          replica_entries(view, standby_names(view)))
    admission = json.dumps(dataclasses.asdict(cfg.admission))
    specs.append(ProcSpec("kvcache", py + ["llmesh.services.kvcache", "--port", str(cfg.kvcache_port)],
                          cfg.kvcache_port, stage=STAGE_BACKENDS))
    for view, model_dir in zip(views, model_dirs):
        for ports in view.replica_ports:
            specs += replica_specs(view, ports, model_dir)
    models = [{"name": m.name, "replica_set": str(replica_set_file(run_dir, cfg, m)),
               "model": model_dir} for m, model_dir in zip(cfg.models, model_dirs[1:])]
    for i, port in enumerate(cfg.router_ports):
        tok = cfg.tokenizer_ports[i % len(cfg.tokenizer_ports)]
        extra = [dict(m, tokenizer=f"127.0.0.1:{v.tokenizer_ports[i % len(v.tokenizer_ports)]}")
                 for m, v in zip(models, views[1:])]
        specs.append(ProcSpec(f"router-{i}", py + [
            "llmesh.services.router", "--port", str(port), "--tokenizer", f"127.0.0.1:{tok}",
            "--replica-set", str(run_dir / REPLICA_SET_FILE), "--model-name", cfg.model_name,
            "--max-message-bytes", str(cfg.max_message_bytes), "--admission", admission,
            "--max-migrations", str(cfg.routing.max_migrations),
            "--replica-wait-s", str(cfg.routing.replica_wait_s),
            "--replica-silence-s", str(cfg.routing.replica_silence_s),
            "--kvcache", f"127.0.0.1:{cfg.kvcache_port}", "--routing-policy", cfg.routing.policy,
            "--prefix-load-bound", str(cfg.routing.prefix_load_bound),
            "--prefix-load-ratio", str(cfg.routing.prefix_load_ratio)]
            + (["--models", json.dumps(extra)] if extra else [])
            + (["--test-fail-requests"] if i == cfg.routing.test_failing_router else [])
            + (["--http-port", str(cfg.http_ports[i]), "--model", model_dirs[0]]
               if cfg.http_ports else [])
            + (["--mtls-dir", cfg.envoy.upstream_mtls_dir] if cfg.envoy.upstream_mtls_dir else []),
            port, stage=STAGE_ROUTERS, extra={"mtls_dir": cfg.envoy.upstream_mtls_dir}))
    if cfg.envoy.xds:  # the control plane serves the routers' clusters to Envoy
        clusters = run_dir / "xds-clusters.json"
        clusters.write_text(json.dumps(xds_clusters(cfg)))
        write_routers(run_dir, cfg.router_ports, cfg.http_ports)
        specs.append(ProcSpec("xds", py + ["llmesh.mesh.xds", "--port", str(cfg.envoy.xds_port),
                                           "--clusters", str(clusters),
                                           "--routers", str(run_dir / ROUTERS_FILE)],
                              cfg.envoy.xds_port, stage=STAGE_BACKENDS))
    envoy_yaml = run_dir / "envoy.yaml"
    envoy_yaml.write_text(render_envoy_yaml(cfg, cfg.envoy.xds_port))
    specs.append(ProcSpec("envoy", [envoy_binary(), "-c", str(envoy_yaml), "--disable-hot-restart",
                                    "--concurrency", "1", "--log-level", "warn"], None,
                          extra={"admin_port": cfg.envoy.admin_port,
                                 "clusters": ("routers", "http") if cfg.http_ports else ("routers",)}))
    add_env(cfg, specs)
    return specs


class Supervisor:
    def __init__(self, specs: list[ProcSpec], run_dir: Path, max_backoff_s: float = 10.0,
                 on_change=None):
        """`on_change()` is called after a restart (new pids). The processes it starts
        inherit its limit on open files, raised to the hard one here."""
        raise_open_files()
        self.specs = specs
        self.run_dir = run_dir
        self.log_dir = run_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.max_backoff_s = max_backoff_s
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._monitor: threading.Thread | None = None
        self.on_change = on_change

    def _spawn(self, spec: ProcSpec) -> None:
        spec.log_path = self.log_dir / f"{spec.name}.log"
        log = open(spec.log_path, "ab")
        spec.proc = subprocess.Popen(spec.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=_child_env() | spec.env)
        log.close()
        spec.started_at = time.monotonic()

    def _ready(self, spec: ProcSpec) -> bool:
        if spec.health_port is not None:
            return is_serving(spec.health_port, mtls_dir=spec.extra.get("mtls_dir", ""))
        return envoy_ready(spec.extra["admin_port"], spec.extra["clusters"])

    def wait_ready(self, spec: ProcSpec, timeout_s: float) -> None:
        self.wait_all_ready([spec], timeout_s)

    def wait_all_ready(self, specs: list[ProcSpec], timeout_s: float) -> None:
        """Wait until every one of `specs` is SERVING; raise as soon as one exits, or
        when some are still not SERVING after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        waiting = list(specs)
        while True:
            for spec in waiting:
                if spec.proc.poll() is not None:
                    raise RuntimeError(f"{spec.name} exited with {spec.proc.returncode}; "
                                       f"see {spec.log_path}")
            waiting = [s for s in waiting if not self._ready(s)]
            if not waiting:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        raise TimeoutError(f"{', '.join(s.name for s in waiting)} not SERVING after "
                           f"{timeout_s:.0f}s; see {waiting[0].log_path}")

    @property
    def is_stopping(self) -> bool:
        return self._stopping.is_set()

    def group_of(self, spec: ProcSpec) -> list[ProcSpec]:
        return [s for s in self.specs if s.group == spec.group] if spec.group else [spec]

    def start(self, timeout_s: float = 120.0) -> None:
        """Start every process in order, each SERVING before the next starts (the
        ranks of a group start together: they rendezvous before serving; so do the
        processes of a stage, which need nothing from each other)."""
        try:
            self._start_in_order(self.specs, timeout_s)
        except Exception:
            self.stop()
            raise
        self._monitor = threading.Thread(target=self._watch, daemon=True)
        self._monitor.start()

    def _start_in_order(self, specs: list[ProcSpec], timeout_s: float) -> None:
        started: set[str] = set()
        for spec in specs:
            if spec.name in started:
                continue
            batch = [s for s in specs if s.stage == spec.stage] if spec.stage else [spec]
            batch = [m for s in batch  # with the whole group of each
                     for m in ([g for g in specs if g.group == s.group] if s.group else [s])]
            batch = [s for i, s in enumerate(batch) if s.name not in started
                     and s.name not in {b.name for b in batch[:i]}]
            for member in batch:
                self._spawn(member)
                started.add(member.name)
            self.wait_all_ready(batch, timeout_s)

    def add(self, specs: list[ProcSpec], timeout_s: float = 120.0) -> None:
        """Start more processes while the others run (a replica joining), in order
        (by stage), each SERVING before the next; supervised (restarted) from then on. If one
        fails to start, those started here are stopped and the error raised."""
        try:
            self._start_in_order(specs, timeout_s)
        except Exception:
            self._terminate([s for s in specs if s.proc is not None], 5.0)
            raise
        with self._lock:
            self.specs.extend(specs)

    def retire(self, names: list[str], timeout_s: float) -> None:
        """Stop these processes for good, together: SIGTERM (a scheduler drains
        first), SIGKILL to those still running after `timeout_s`. They are no
        longer restarted."""
        with self._lock:
            specs = [s for name in names for s in self.specs if s.name == name]
            self.specs = [s for s in self.specs if s.name not in names]
        self._terminate(specs, timeout_s)

    @staticmethod
    def _terminate(specs: list[ProcSpec], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for spec in specs:
            if spec.proc.poll() is None:
                spec.proc.terminate()
        for spec in specs:
            try:
                spec.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                spec.proc.kill()
                spec.proc.wait()

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            with self._lock:
                for spec in self.specs:
                    if spec.proc is None or spec.proc.poll() is None:
                        continue
                    if self._stopping.is_set():
                        return
                    ran_s = time.monotonic() - spec.started_at
                    if ran_s > 30:
                        spec.restarts = 0  # it had been healthy for a while
                    backoff = min(self.max_backoff_s, 0.25 * 2 ** spec.restarts)
                    spec.restarts += 1
                    group = self.group_of(spec)
                    for member in group:  # a TP group cannot go on without any rank
                        if member.proc.poll() is None:
                            member.proc.kill()
                            member.proc.wait()
                        with open(self.log_dir / f"{member.name}.log", "ab") as f:
                            why = ("exited" if member is spec else f"stopped with {spec.name}")
                            f.write(f"[supervisor] {member.name} {why} ({member.proc.returncode});"
                                    f" restart #{spec.restarts} in {backoff:.2f}s\n".encode())
                    time.sleep(backoff)
                    for member in group:
                        self._spawn(member)
                    if self.on_change is not None:
                        self.on_change()  # new pids

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every process (Envoy and routers first), SIGKILL stragglers; the
        trace collector last, so the services' final span exports still land."""
        self._stopping.set()
        with self._lock:
            specs = [s for s in reversed(self.specs) if s.proc is not None]
            services = [s.proc for s in specs if s.name != "collector"]
            collector = [s.proc for s in specs if s.name == "collector"]
            deadline = time.monotonic() + timeout_s
            for batch in (services, collector):
                for p in batch:
                    if p.poll() is None:
                        p.terminate()
                for p in batch:
                    try:
                        p.wait(max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()

    def pids(self) -> dict[str, int]:
        return {s.name: s.proc.pid for s in self.specs if s.proc is not None}


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def write_state(run_dir: Path, state: dict) -> None:
    tmp = run_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, run_dir / "state.json")
