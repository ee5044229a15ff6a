"""Replicas that come and go while the mesh runs (`llmesh scale --replicas N`).

A replica joins: its executors, then its scheduler, start on fresh ports; once
the scheduler is SERVING it is added to the routers' replica set (the file they
watch), so nothing is sent to it before. A replica leaves: the replica set
marks it draining (routers send it nothing new), its scheduler gets SIGTERM and
drains (running requests finish, up to `engine.drain_timeout_s`; a request that
reaches it meanwhile is refused as draining and goes to another replica), then
its executors stop and it leaves the set. The newest regular replicas leave
first; warm standbys are not scaled.

Each served model (mesh.yaml's top-level model and its `models:`) has its own
Scaler and replica set; replica numbers are the mesh's, so a model's new
replica takes the next number free in the whole mesh. The supervisor's loop
calls `ScaleRequests.poll()`: it reads the model and desired count that
`llmesh scale [--model NAME]` wrote (`desired.json` in the run directory) and
reports the outcome in state.json (`scale`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path

import grpc

from llmesh.v1 import scheduler_pb2, scheduler_pb2_grpc
from llmesh.mesh.autoscaler import AutoscalerPolicy, DecisionLog, Signals
from llmesh.mesh.config import MeshConfig, ReplicaPorts
from llmesh.mesh.ports import free_port, replica_process_names
from llmesh.mesh.supervisor import Supervisor, replica_entries, replica_specs, standby_names
from llmesh.services.router.replica_set import write_replica_set

log = logging.getLogger("llmesh.mesh")

DESIRED_FILE = "desired.json"
ROUTERS_SEE_S = 0.6  # a replica set change reaches every router (they poll every 0.2 s)


class ReplicaNumbers:
    """The next replica number free in the whole mesh (every model's replicas)."""

    def __init__(self, cfg: MeshConfig):
        self._next = max((p.index for view in cfg.served() for p in view.replica_ports),
                         default=-1) + 1
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            self._next += 1
            return self._next - 1


class Scaler:
    def __init__(self, cfg: MeshConfig, sup: Supervisor, model_dir: str, replica_set: Path,
                 numbers: ReplicaNumbers, on_change=None):
        """`cfg`: one served model's view of the mesh as started (MeshConfig.served(),
        ports resolved); `replica_set`: that model's replica set file; `numbers`:
        the mesh's replica numbers; `on_change()`: the replicas changed (state.json
        is rewritten from `self.cfg`)."""
        self.cfg = cfg
        self.sup = sup
        self.model_dir = model_dir
        self.replica_set = replica_set
        self.numbers = numbers
        self.on_change = on_change
        self.standby = standby_names(cfg)
        self.warm_pool = cfg.autoscaler.warm_pool
        self.pool: list[ReplicaPorts] = []  # warm: SERVING, not in the replica set
        self._lock = threading.RLock()  # (the pool fills in a thread of its own)
        self._filling: threading.Thread | None = None
        self.joins: list[dict] = []  # each replica that joined: warm or cold, how long it took

    @property
    def num_replicas(self) -> int:
        """Regular replicas (warm standbys not counted)."""
        return sum(f"replica-{p.index}" not in self.standby for p in self.cfg.replica_ports)

    def scale_to(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"replicas: at least 1, not {n}")
        if self.num_replicas < n:
            self.add_replicas(n - self.num_replicas)
        elif self.num_replicas > n:
            self.remove_replicas(self.num_replicas - n)

    def add_replicas(self, k: int) -> None:
        """`k` replicas join at once: those from the warm pool now, the others as
        each of their cold starts (made side by side) serves. Raises the first
        start's error after the others have joined."""
        errors = []

        def one():
            try:
                self.add_replica()
            except Exception as e:  # (the others go on)
                errors.append(e)
        with self._lock:
            warm = min(k, len(self.pool))
        for _ in range(warm):
            one()
        threads = [threading.Thread(target=one, daemon=True) for _ in range(k - warm)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def add_replica(self) -> str:
        """A replica joins the routers: one from the warm pool (loaded, SERVING,
        given no traffic yet: it joins at once, and the pool is refilled in the
        background), or else one started now (a cold start: the model loads)."""
        t0 = time.monotonic()
        with self._lock:
            ports = self.pool.pop(0) if self.pool else None
        kind = "warm" if ports is not None else "cold"
        if ports is None:
            ports = self._start_replica()
        with self._lock:
            self.cfg = dataclasses.replace(self.cfg,
                                           replica_ports=self.cfg.replica_ports + (ports,))
            self._write_set()
        took = time.monotonic() - t0
        with self._lock:
            self.joins.append({"replica": f"replica-{ports.index}", "start": kind,
                               "seconds": round(took, 3)})
        log.info("replica-%d joins (%s start, %.2f s to join; scheduler on %d)", ports.index,
                 kind, took, ports.scheduler)
        self.changed()
        self.fill_pool()
        return f"replica-{ports.index}"

    def fill_pool(self) -> None:
        """Start warm replicas in the background until the pool holds `warm_pool`."""
        if not self.warm_pool:
            return
        with self._lock:
            if self._filling is not None and self._filling.is_alive():
                return
            self._filling = threading.Thread(target=self._fill, daemon=True)
            self._filling.start()

    def _fill(self) -> None:
        while len(self.pool) < self.warm_pool and not self.sup.is_stopping:
            try:
                ports = self._start_replica()
            except Exception:
                log.exception("a warm replica failed to start")
                return
            with self._lock:
                self.pool.append(ports)
            log.info("replica-%d is warm (loaded, no traffic yet)", ports.index)
            self.changed()

    def _start_replica(self) -> ReplicaPorts:
        """Start a replica's processes (SERVING when this returns), not yet listed."""
        with self._lock:
            ports = self._fresh_ports()
            self.cfg = self._with_metrics_ports(ports)
            specs = replica_specs(self.cfg, ports, self.model_dir)
        self.sup.add(specs)
        return ports

    def remove_replicas(self, k: int) -> list[str]:
        """The `k` newest regular replicas drain and leave, together: marked draining
        in the replica set, their schedulers stopped (each drains its running
        requests first), then their executors, then out of the set."""
        with self._lock:
            leaving = [p for p in reversed(self.cfg.replica_ports)
                       if f"replica-{p.index}" not in self.standby][:k]
            names = {f"replica-{p.index}" for p in leaving}
            self._write_set(draining=names)
        log.info("%s drain and leave", ", ".join(sorted(names)))
        time.sleep(ROUTERS_SEE_S)
        processes = [replica_process_names(p) for p in leaving]
        self.sup.retire([proc[0] for proc in processes],
                        timeout_s=self.cfg.engine.drain_timeout_s + 10)
        self.sup.retire([name for proc in processes for name in proc[1:]], timeout_s=10)
        gone = {name for proc in processes for name in proc}
        with self._lock:
            obs = self.cfg.observability
            metrics = {k: v for k, v in obs.metrics_ports.items() if k not in gone}
            self.cfg = dataclasses.replace(
                self.cfg, replica_ports=tuple(p for p in self.cfg.replica_ports
                                              if f"replica-{p.index}" not in names),
                observability=dataclasses.replace(obs, metrics_ports=metrics))
            self._write_set()
        self.changed()
        return sorted(names)

    def signals(self, t: float) -> Signals | None:
        """What the autoscaler reads: the serving regular replicas' scheduler stats
        (None when none answers)."""
        with self._lock:
            ports = [p for p in self.cfg.replica_ports
                     if f"replica-{p.index}" not in self.standby]
        stats = []
        for p in ports:
            try:
                with grpc.insecure_channel(f"127.0.0.1:{p.scheduler}") as ch:
                    stats.append(scheduler_pb2_grpc.SchedulerStub(ch).GetStats(
                        scheduler_pb2.GetStatsRequest(), timeout=1.0))
            except grpc.RpcError:
                continue
        stats = [s for s in stats if not s.is_draining]
        if not stats:
            return None
        pressure = max((s.predicted_wait_s[c] / b for s in stats
                        for c, b in s.ttft_budget_s.items() if b > 0), default=0.0)
        return Signals(
            t=t, replicas=len(ports), running=sum(s.num_running for s in stats),
            slots=sum(s.max_num_seqs for s in stats), waiting=sum(s.num_waiting for s in stats),
            pressure=pressure, kv_usage=max(s.kv_usage for s in stats),
            kv_waste=sum(s.kv_waste for s in stats) / len(stats),
            prefix_hit_rate=sum(s.prefix_hit_rate for s in stats) / len(stats),
            arrivals=sum(s.num_admitted + s.num_rejected for s in stats))

    # ---- helpers -------------------------------------------------------------
    def _write_set(self, draining=()) -> None:
        write_replica_set(self.replica_set, replica_entries(self.cfg, self.standby, draining))

    def changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _fresh_ports(self) -> ReplicaPorts:
        taken = _ports_of(self.cfg) | {q for p in self.pool
                                       for q in (p.scheduler, p.dist_port, *p.executors)}

        def pick() -> int:
            p = 0
            while not p or p in taken:
                p = free_port()
            taken.add(p)
            return p
        tp = self.cfg.tensor_parallel
        index = self.numbers.take()
        return ReplicaPorts(pick(), tuple(pick() for _ in range(tp)),
                            pick() if tp > 1 else 0, index)

    def _with_metrics_ports(self, ports: ReplicaPorts) -> MeshConfig:
        obs = self.cfg.observability
        if not obs.metrics:
            return self.cfg
        taken = _ports_of(self.cfg) | {ports.scheduler, ports.dist_port, *ports.executors}
        metrics = dict(obs.metrics_ports)
        for name in replica_process_names(ports):
            p = 0
            while not p or p in taken:
                p = free_port()
            taken.add(p)
            metrics[name] = p
        return dataclasses.replace(self.cfg, observability=dataclasses.replace(
            obs, metrics_ports=metrics))


class ScaleRequests:
    """`llmesh scale [--model NAME] --replicas N`, as desired.json says, to the
    Scaler of that model (`scalers`: by model name, the top-level model first)."""

    def __init__(self, scalers: dict[str, Scaler], run_dir: Path):
        self.scalers = scalers
        self.run_dir = run_dir
        self._seen_request = None
        (run_dir / DESIRED_FILE).unlink(missing_ok=True)  # (a request to an earlier mesh)
        self.last: dict = {}  # the last request's outcome, for state.json

    def poll(self) -> None:
        """Act on a new request in desired.json, if there is one."""
        try:
            want = json.loads((self.run_dir / DESIRED_FILE).read_text())
        except (OSError, ValueError):
            return
        if want.get("id") == self._seen_request:
            return
        self._seen_request = want.get("id")
        model = want.get("model") or next(iter(self.scalers))
        self.last = {"id": want.get("id"), "model": model, "desired": want.get("replicas"),
                     "status": "scaling"}
        scaler = self.scalers.get(model)
        if scaler is None:
            self.last.update(status="failed", error=f"model {model!r} is not served (served: "
                             f"{', '.join(self.scalers)})")
            return
        scaler.changed()
        try:
            scaler.scale_to(int(want["replicas"]))
            self.last["status"] = "ok"
        except Exception as e:  # reported to `llmesh scale`, and the mesh goes on
            log.exception("scaling %s to %s replicas failed", model, want.get("replicas"))
            self.last.update(status="failed", error=str(e))
        scaler.changed()


class Autoscale:
    """The autoscaler's loop: every tick_s, signals -> decision -> scale."""

    def __init__(self, scaler: Scaler, run_dir: Path, slug: str = ""):
        """`slug`: a model of `models:` (its files get its name); "" the top-level one."""
        self.scaler = scaler
        self.run_dir = run_dir
        self.cfg = scaler.cfg.autoscaler
        self.policy = AutoscalerPolicy(self.cfg)
        self.suffix = f"-{slug}" if slug else ""
        self.log = DecisionLog(run_dir, scaler.cfg.model_name, f"autoscaler{self.suffix}.jsonl")
        self.last: dict = {}  # the last change, for state.json
        self._next_t = 0.0

    def tick(self, now: float) -> None:
        if now < self._next_t:
            return
        self._next_t = now + self.cfg.tick_s
        signals = self.scaler.signals(now)
        if signals is None:
            return
        if self.cfg.record_signals:
            with open(self.run_dir / f"autoscaler-signals{self.suffix}.jsonl", "a") as f:
                f.write(json.dumps(dataclasses.asdict(signals)) + "\n")
        decision = self.policy.decide(signals)
        self.log.record(decision, signals)
        if decision.action == "hold":
            return
        self.last = {"t": decision.t, "from": decision.current, "to": decision.desired,
                     "rule": decision.rule, "reason": decision.reason}
        try:
            self.scaler.scale_to(decision.desired)
        except Exception:
            log.exception("autoscaler: scaling to %d failed", decision.desired)


def _ports_of(cfg: MeshConfig) -> set[int]:
    ports = {cfg.envoy.port, cfg.envoy.admin_port, cfg.envoy.xds_port, cfg.kvcache_port,
             cfg.observability.collector_port, *cfg.router_ports, *cfg.tokenizer_ports,
             *cfg.http_ports, *cfg.observability.metrics_ports.values()}
    for r in cfg.replica_ports:
        ports |= {r.scheduler, r.dist_port, *r.executors}
    return ports - {0}


def request_scale(run_dir: Path, replicas: int, model: str = "") -> str:
    """Ask the running supervisor for `replicas` regular replicas of `model` ("" = the
    top-level model); the request's id."""
    request_id = f"{time.time_ns()}"
    tmp = run_dir / (DESIRED_FILE + ".tmp")
    tmp.write_text(json.dumps({"replicas": replicas, "id": request_id, "model": model}))
    tmp.replace(run_dir / DESIRED_FILE)
    return request_id
