"""What the standalone benchmark scripts share: a mesh on free loopback ports
(tracing and metrics off) for the length of a `with`, and their JSON report."""
from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

from llmesh.mesh.config import EngineLimits, EnvoyConfig, MeshConfig, ObservabilityConfig, resolve_ports
from llmesh.mesh.supervisor import Supervisor, build_specs


@contextlib.contextmanager
def supervised_mesh(model_dir: str, topology: dict | None = None, **engine):
    """Bring a mesh up (one replica unless `topology` says otherwise, engine limits
    from `engine`), yield (Envoy's host:port, its Supervisor), stop every process after."""
    run_dir = Path(tempfile.mkdtemp(prefix="llmesh-bench-"))
    cfg = resolve_ports(MeshConfig(
        model=model_dir, run_dir=str(run_dir), envoy=EnvoyConfig(port=0, admin_port=0),
        engine=EngineLimits(**engine),
        observability=ObservabilityConfig(tracing="off", metrics=False), **(topology or {})))
    sup = Supervisor(build_specs(cfg, model_dir, run_dir), run_dir)
    sup.start()
    try:
        yield f"127.0.0.1:{cfg.envoy.port}", sup
    finally:
        sup.stop()


@contextlib.contextmanager
def local_mesh(model_dir: str, **engine):
    """A one-replica mesh for the length of a `with`: yields Envoy's host:port."""
    with supervised_mesh(model_dir, **engine) as (endpoint, _):
        yield endpoint


def write_report(args, result: dict) -> dict:
    """The machine, versions and arguments with `result`: printed, and written to
    `args.json` when given."""
    from llmesh.benchmarks.machine import machine_info, versions
    report = {"machine": machine_info(), "versions": versions(), "args": vars(args), **result}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return report
