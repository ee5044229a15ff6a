"""The supervisor process: the mesh brought up, scaled on request (`llmesh scale`) and
by the autoscaler, brought down on SIGTERM / SIGINT.

`python -m llmesh.mesh.foreground --config RESOLVED.yaml` is what `llmesh up --detach`
runs in the background; it writes `state.json` in the run directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
import time
from pathlib import Path

from llmesh.mesh.tls import tls_state
from llmesh.mesh.config import MeshConfig, load_config
from llmesh.mesh.ports import replica_process_names
from llmesh.mesh.scaling import Autoscale, ReplicaNumbers, ScaleRequests, Scaler
from llmesh.mesh.supervisor import Supervisor, build_specs, replica_set_file, write_state


class _Listeners:
    """Called (from any thread) when the mesh changes; calls what listens by then."""

    def __init__(self):
        self._listeners: list = []

    def listen(self, fn) -> None:
        self._listeners.append(fn)

    def __call__(self) -> None:
        for fn in list(self._listeners):
            fn()


def run_foreground(cfg: MeshConfig, model_dir: str, run_dir: Path, on_ready=None) -> int:
    """Bring the mesh up, write state.json, scale on request (`llmesh scale`), wait for
    SIGTERM / SIGINT, bring it down."""
    changed = _Listeners()  # a restart or a scale: state.json is written again
    sup = Supervisor(build_specs(cfg, model_dir, run_dir), run_dir, on_change=changed)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        sup.start()
    except Exception as e:
        write_state(run_dir, {"status": "failed", "error": str(e), "supervisor_pid": os.getpid()})
        print(f"llmesh: error: {e}", file=sys.stderr)
        return 1
    numbers = ReplicaNumbers(cfg)
    scalers = {view.model_name: Scaler(view, sup, view.model if model else model_dir,
                                       replica_set_file(run_dir, cfg, model), numbers,
                                       on_change=changed)
               for model, view in zip((None,) + cfg.models, cfg.served())}
    requests = ScaleRequests(scalers, run_dir)
    scaler = scalers[cfg.model_name]
    # each model whose autoscaler is on (mesh.yaml's `autoscaler`, or a model's own)
    autoscales = {view.model_name: Autoscale(scalers[view.model_name], run_dir,
                                             model.slug if model else "")
                  for model, view in zip((None,) + cfg.models, cfg.served())
                  if view.autoscaler.enabled}
    if autoscales:
        if "autoscaler" in cfg.observability.metrics_ports:
            from prometheus_client import start_http_server
            start_http_server(cfg.observability.metrics_ports["autoscaler"], addr="127.0.0.1")
        for name in autoscales:
            scalers[name].fill_pool()
    state_lock = threading.Lock()  # (written from this thread and the supervisor's)

    def ready_state():
        live = live_config(cfg, list(scalers.values()))
        with state_lock:
            write_state(run_dir, {"status": "ready", "supervisor_pid": os.getpid(),
                                  "pids": sup.pids(),
                                  "config": live.to_dict(), "model_dir": model_dir,
                                  "endpoint": f"127.0.0.1:{live.envoy.port}",
                                  "tls": tls_state(live),
                                  "replicas": scaler.num_replicas,
                                  "models": {name: {
                                      "replicas": s.num_replicas, "model_dir": s.model_dir,
                                      "warm_pool": [f"replica-{p.index}" for p in s.pool],
                                      "autoscaler": autoscales[name].last
                                      if name in autoscales else None}
                                      for name, s in scalers.items()},
                                  "scale": requests.last,
                                  "warm_pool": [f"replica-{p.index}" for p in scaler.pool],
                                  "autoscaler": autoscales[cfg.model_name].last
                                  if cfg.model_name in autoscales else None,
                                  "joins": scaler.joins})
    ready_state()
    changed.listen(ready_state)
    if on_ready:
        on_ready()
    while not stop.wait(0.2):
        requests.poll()
        for autoscale in autoscales.values():
            autoscale.tick(time.monotonic())
    sup.stop()
    write_state(run_dir, {"status": "stopped", "supervisor_pid": os.getpid()})
    return 0


def live_config(cfg: MeshConfig, scalers: list[Scaler]) -> MeshConfig:
    """The mesh as it runs now: each model's replicas as its Scaler has them (the
    top-level model's first), and the metrics ports of the processes still up."""
    replica_names = {name for s in scalers for p in (*s.cfg.replica_ports, *s.pool)
                     for name in replica_process_names(p)}
    metrics = {name: port for name, port in cfg.observability.metrics_ports.items()
               if not name.startswith(("scheduler-", "executor-"))}
    for s in scalers:
        metrics.update({name: port for name, port in s.cfg.observability.metrics_ports.items()
                        if name in replica_names})
    main = scalers[0].cfg
    return dataclasses.replace(
        cfg, replica_ports=main.replica_ports,
        models=tuple(dataclasses.replace(m, replica_ports=s.cfg.replica_ports)
                     for m, s in zip(cfg.models, scalers[1:])),
        observability=dataclasses.replace(cfg.observability, metrics_ports=metrics))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llmesh.mesh.foreground")
    p.add_argument("--config", required=True, help="resolved mesh config (ports filled in)")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--run-dir", required=True)
    args = p.parse_args(argv)
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_foreground(load_config(args.config), args.model_dir, Path(args.run_dir))


if __name__ == "__main__":
    sys.exit(main())
