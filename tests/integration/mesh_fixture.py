"""Bring a real mesh up on loopback (ports picked at run time) and down again by pid."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

import mesh_downs

ROOT = Path(__file__).resolve().parents[2]


class Mesh:
    def __init__(self, model_dir: Path, run_dir: Path, **overrides):
        self.run_dir = run_dir
        self.config_path = run_dir / "mesh.yaml"
        cfg = {"model": str(model_dir), "run_dir": str(run_dir),
               "envoy": {"port": 0, "admin_port": 0}, "engine": {"num_kv_blocks": 512}}
        for key, value in overrides.items():
            if isinstance(value, dict):
                cfg.setdefault(key, {}).update(value)
            else:
                cfg[key] = value
        run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.state: dict = {}

    def cli(self, *args, timeout=120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mesh.cli", *args, "--config",
                               str(self.config_path)], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def up(self) -> "Mesh":
        proc = self.cli("up", "--detach", timeout=300)
        if proc.returncode != 0:
            self.down()
            raise RuntimeError(f"llmesh up failed: {proc.stderr}\n{self.logs()}")
        self.state = json.loads((self.run_dir / "state.json").read_text())
        return self

    @property
    def endpoint(self) -> str:
        return self.state["endpoint"]

    @property
    def config(self) -> dict:
        return self.state["config"]

    def down(self) -> None:
        self.cli("down", timeout=60)
        # whatever the supervisor left behind is killed by pid
        state_path = self.run_dir / "state.json"
        pids = list(self.state.get("pids", {}).values()) + [self.state.get("supervisor_pid", 0)]
        if state_path.exists():
            try:
                pids += list(json.loads(state_path.read_text()).get("pids", {}).values())
            except ValueError:
                pass
        for pid in pids:
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def logs(self) -> str:
        out = []
        for f in sorted((self.run_dir / "logs").glob("*.log")):
            out.append(f"== {f.name}\n" + "\n".join(f.read_text().splitlines()[-15:]))
        return "\n".join(out)


def serving(mesh: Mesh):
    """A module fixture's body: up, yield the mesh, down, and check that no process
    it ran (restarted ones included) is left behind. The down runs in the background
    beside the next mesh's start, and is checked once that mesh is up (tests/mesh_downs.py)."""
    try:
        mesh.up()
    finally:
        try:
            mesh_downs.finish()  # the previous module's mesh
        except BaseException:
            mesh.down()  # (this one goes too: no teardown runs for a fixture that failed)
            raise
    yield mesh
    pids = dict(mesh.state["pids"])
    state_path = mesh.run_dir / "state.json"
    if state_path.exists():
        pids.update(json.loads(state_path.read_text()).get("pids", {}))  # after restarts
    mesh_downs.going_down(mesh.run_dir.name, mesh.down, pids, _alive)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def health_status(port: int):
    """A service's own gRPC health status, or None when it does not answer."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=1).status
    except grpc.RpcError:
        return None


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
