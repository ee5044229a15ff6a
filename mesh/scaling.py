"""Replicas that come and go while the mesh runs (`llmesh scale --replicas N`).

A replica joins: its executors, then its scheduler, start on fresh ports; once
the scheduler is SERVING it is added to the routers' replica set (the file they
watch), so nothing is sent to it before. A replica leaves: the replica set
marks it draining (routers send it nothing new), its scheduler gets SIGTERM and
drains (running requests finish, up to `engine.drain_timeout_s`; a request that
reaches it meanwhile is refused as draining and goes to another replica), then
its executors stop and it leaves the set. The newest regular replicas leave
first; warm standbys are not scaled.

The supervisor's loop calls `Scaler.poll()`: it reads the desired count that
`llmesh scale` wrote (`desired.json` in the run directory) and reports the
outcome in state.json (`scale`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from mesh.config import MeshConfig, ReplicaPorts, free_port, replica_process_names
from mesh.supervisor import (REPLICA_SET_FILE, Supervisor, replica_entries, replica_specs,
                             standby_names)
from services.router.replica_set import write_replica_set

log = logging.getLogger("llmesh.mesh")

DESIRED_FILE = "desired.json"
ROUTERS_SEE_S = 0.6  # a replica set change reaches every router (they poll every 0.2 s)


class Scaler:
    def __init__(self, cfg: MeshConfig, sup: Supervisor, model_dir: str, run_dir: Path,
                 on_change=None):
        """`cfg`: the mesh as started (ports resolved); `on_change()`: the replicas
        changed (state.json is rewritten from `self.cfg`)."""
        self.cfg = cfg
        self.sup = sup
        self.model_dir = model_dir
        self.run_dir = run_dir
        self.on_change = on_change
        self.standby = standby_names(cfg)
        self._next_index = max((p.index for p in cfg.replica_ports), default=-1) + 1
        self._seen_request = None
        self.last: dict = {}  # the last request's outcome, for state.json

    @property
    def num_replicas(self) -> int:
        """Regular replicas (warm standbys not counted)."""
        return sum(f"replica-{p.index}" not in self.standby for p in self.cfg.replica_ports)

    def poll(self) -> None:
        """Act on a new request in desired.json, if there is one."""
        try:
            want = json.loads((self.run_dir / DESIRED_FILE).read_text())
        except (OSError, ValueError):
            return
        if want.get("id") == self._seen_request:
            return
        self._seen_request = want.get("id")
        self.last = {"id": want.get("id"), "desired": want.get("replicas"), "status": "scaling"}
        self._changed()
        try:
            self.scale_to(int(want["replicas"]))
            self.last["status"] = "ok"
        except Exception as e:  # reported to `llmesh scale`, and the mesh goes on
            log.exception("scaling to %s replicas failed", want.get("replicas"))
            self.last.update(status="failed", error=str(e))
        self._changed()

    def scale_to(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"replicas: at least 1, not {n}")
        while self.num_replicas < n:
            self.add_replica()
        while self.num_replicas > n:
            self.remove_replica()

    def add_replica(self) -> str:
        """Start a replica and, once it serves, give it to the routers."""
        ports = self._fresh_ports()
        cfg = self._with_metrics_ports(ports)
        log.info("replica-%d joins (scheduler on %d)", ports.index, ports.scheduler)
        self.sup.add(replica_specs(cfg, ports, self.model_dir))
        self.cfg = dataclasses.replace(cfg, replica_ports=cfg.replica_ports + (ports,))
        self._write_set()
        self._changed()
        return f"replica-{ports.index}"

    def remove_replica(self) -> str:
        """Drain the newest regular replica, stop it, and take it out of the set."""
        ports = next(p for p in reversed(self.cfg.replica_ports)
                     if f"replica-{p.index}" not in self.standby)
        name = f"replica-{ports.index}"
        log.info("%s drains and leaves", name)
        self._write_set(draining={name})
        time.sleep(ROUTERS_SEE_S)
        scheduler, *executors = replica_process_names(ports)
        self.sup.retire([scheduler], timeout_s=self.cfg.engine.drain_timeout_s + 10)
        self.sup.retire(executors, timeout_s=10)
        obs = self.cfg.observability
        metrics = {k: v for k, v in obs.metrics_ports.items()
                   if k not in (scheduler, *executors)}
        self.cfg = dataclasses.replace(
            self.cfg, replica_ports=tuple(p for p in self.cfg.replica_ports if p is not ports),
            observability=dataclasses.replace(obs, metrics_ports=metrics))
        self._write_set()
        self._changed()
        return name

    # ---- helpers -------------------------------------------------------------
    def _write_set(self, draining=()) -> None:
        write_replica_set(self.run_dir / REPLICA_SET_FILE,
                          replica_entries(self.cfg, self.standby, draining))

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _fresh_ports(self) -> ReplicaPorts:
        taken = _ports_of(self.cfg)

        def pick() -> int:
            p = 0
            while not p or p in taken:
                p = free_port()
            taken.add(p)
            return p
        tp = self.cfg.tensor_parallel
        index, self._next_index = self._next_index, self._next_index + 1
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


def _ports_of(cfg: MeshConfig) -> set[int]:
    ports = {cfg.envoy.port, cfg.envoy.admin_port, cfg.envoy.xds_port, cfg.kvcache_port,
             cfg.observability.collector_port, *cfg.router_ports, *cfg.tokenizer_ports,
             *cfg.http_ports, *cfg.observability.metrics_ports.values()}
    for r in cfg.replica_ports:
        ports |= {r.scheduler, r.dist_port, *r.executors}
    return ports - {0}


def request_scale(run_dir: Path, replicas: int) -> str:
    """Ask the running supervisor for `replicas` regular replicas; the request's id."""
    request_id = f"{time.time_ns()}"
    tmp = run_dir / (DESIRED_FILE + ".tmp")
    tmp.write_text(json.dumps({"replicas": replicas, "id": request_id}))
    tmp.replace(run_dir / DESIRED_FILE)
    return request_id
