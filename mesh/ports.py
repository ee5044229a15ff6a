"""Ports and process names of a mesh: `resolve_ports` fills every port mesh.yaml
leaves at 0 with a free loopback port, once, before anything starts."""
from __future__ import annotations

import dataclasses
import random
import socket
from pathlib import Path

from llmesh.mesh.config import MeshConfig, ReplicaPorts, ServedModel


# Picks come from below the kernel's ephemeral range where it leaves room: a port the
# kernel hands out for bind(0) is also one it may give any outgoing connection's
# source before the service binds it (seen once: a scheduler's metrics port taken).
LOWEST_PICK = 10000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port() -> int:
    """A loopback port free now: a random one below the ephemeral range when there
    is room (checked by binding it), else one the kernel picks."""
    top = _ephemeral_start()
    if top - LOWEST_PICK >= 1000:
        for _ in range(50):
            port = random.randrange(LOWEST_PICK, top)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_process_names(ports: ReplicaPorts) -> list[str]:
    return [f"scheduler-{ports.index}"] + [f"executor-{ports.index}-{k}"
                                           for k in range(len(ports.executors))]


def tokenizer_process_name(model: ServedModel | None, i: int) -> str:
    """Tokenizer i of the top-level model (None) or of one of `models:`."""
    return f"tokenizer-{i}" if model is None else f"tokenizer-{model.slug}-{i}"


def resolve_ports(cfg: MeshConfig) -> MeshConfig:
    """Fill every port of 0 (or missing) with a free loopback port; number the
    replicas of `models:` after the top-level model's (replica names are the mesh's)."""
    # ports the config names, so an automatic pick never lands on one of them
    taken: set[int] = {cfg.envoy.port, cfg.envoy.admin_port, cfg.envoy.xds_port,
                       cfg.observability.collector_port,
                       cfg.kvcache_port, *cfg.router_ports, *cfg.tokenizer_ports, *cfg.http_ports,
                       *cfg.observability.metrics_ports.values()} - {0}
    for view in cfg.served():
        taken |= set(view.tokenizer_ports) - {0}
        for r in view.replica_ports:
            taken |= {r.scheduler, r.dist_port, *r.executors} - {0}

    def pick(p: int) -> int:
        if p:
            return p
        # the kernel may hand the same free port out twice in a row: never reuse one
        while not p or p in taken:
            p = free_port()
        taken.add(p)
        return p

    next_index = [0]

    def replicas_of(view: MeshConfig) -> tuple[ReplicaPorts, ...]:
        tp = view.tensor_parallel
        listed = list(view.replica_ports) + [ReplicaPorts(executors=(0,) * tp)] * (
            view.replicas - len(view.replica_ports))
        out = []
        for r in listed:
            index = r.index if r.index >= 0 else next_index[0]
            next_index[0] = max(next_index[0], index + 1)
            out.append(ReplicaPorts(pick(r.scheduler), tuple(pick(p) for p in r.executors),
                                    pick(r.dist_port) if tp > 1 else 0, index))
        return tuple(out)

    routers = tuple(pick(p) for p in (cfg.router_ports or (0,) * cfg.routers))
    tokenizers = tuple(pick(p) for p in (cfg.tokenizer_ports or (0,) * cfg.tokenizers))
    http = tuple(pick(p) for p in (cfg.http_ports or (0,) * len(routers))) if cfg.http_api else ()
    replicas = replicas_of(cfg)
    models = tuple(dataclasses.replace(
        m, tokenizer_ports=tuple(pick(p) for p in (m.tokenizer_ports or (0,) * m.tokenizers)),
        replica_ports=replicas_of(view)) for m, view in zip(cfg.models, cfg.served()[1:]))
    envoy = dataclasses.replace(cfg.envoy, port=pick(cfg.envoy.port),
                                admin_port=pick(cfg.envoy.admin_port),
                                xds_port=pick(cfg.envoy.xds_port) if cfg.envoy.xds else 0)
    obs = cfg.observability
    metrics_ports = {}
    if obs.metrics:
        names = [f"router-{i}" for i in range(len(routers))]
        names += [tokenizer_process_name(None, i) for i in range(len(tokenizers))] + ["kvcache"]
        for ports in replicas:
            names += replica_process_names(ports)
        for m in models:
            names += [tokenizer_process_name(m, i) for i in range(len(m.tokenizer_ports))]
            for ports in m.replica_ports:
                names += replica_process_names(ports)
        if any(view.autoscaler.enabled for view in cfg.served()):
            names.append("autoscaler")  # (the supervisor's: its decisions, every model's)
        metrics_ports = {n: pick(obs.metrics_ports.get(n, 0)) for n in names}
    obs = dataclasses.replace(
        obs, metrics_ports=metrics_ports,
        collector_port=pick(obs.collector_port) if obs.tracing == "file" else 0)
    return dataclasses.replace(cfg, router_ports=routers, tokenizer_ports=tokenizers, http_ports=http,
                               replica_ports=replicas, kvcache_port=pick(cfg.kvcache_port),
                               envoy=envoy, observability=obs, models=models)
