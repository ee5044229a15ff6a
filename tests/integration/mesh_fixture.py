"""Bring a real mesh up on loopback (ports picked at run time) and down again by pid."""
from __future__ import annotations

import argparse
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
        return subprocess.run([sys.executable, "-m", "llmesh.mesh.cli", *args, "--config",
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

    def down(self, in_process: bool = False) -> tuple[str, list[str]]:
        """`llmesh down`, then whatever it left behind is killed by pid. Returns what
        `llmesh down` said when it was not a plain stop (its exit status and output, or
        the exception; '' for a plain stop) and the processes still up when it returned.
        The kill pass runs whatever happened. `in_process` runs the command's function
        here instead of the CLI: for a down in a background thread, which must not
        spawn a process while the main thread spawns the next mesh's (twice such a
        spawn failed with EFAULT, once in CI, once in a full local run)."""
        # every process the mesh ran: as it came up, and as the supervisor last wrote
        # them (restarted ones); read before the down, after which state.json has none
        pids = {**self.state.get("pids", {}), "supervisor": self.state.get("supervisor_pid", 0)}
        try:
            pids.update(json.loads((self.run_dir / "state.json").read_text()).get("pids", {}))
        except (OSError, ValueError):
            pass
        t0, left = time.monotonic(), []
        try:
            if in_process:
                from llmesh.mesh.commands import cmd_down
                rc = cmd_down(argparse.Namespace(config=str(self.config_path), timeout=30.0))
                said = "" if rc == 0 else (
                    f"llmesh down returned {rc} after {time.monotonic() - t0:.1f} s")
            else:
                proc = self.cli("down", timeout=90)
                said = "" if proc.returncode == 0 else (
                    f"llmesh down exited {proc.returncode} after {time.monotonic() - t0:.1f} s: "
                    f"{proc.stdout}{proc.stderr}")
        except Exception as e:  # (the kill pass below still runs)
            said = f"llmesh down raised after {time.monotonic() - t0:.1f} s: {e!r}"
        finally:
            # (a process `llmesh down` had to kill may take a moment to go)
            wait_until(lambda: not any(pid and _alive(pid) for pid in pids.values()), 5)
            left = [name for name, pid in pids.items() if pid and _alive(pid)]
            for name in left:
                try:
                    os.kill(pids[name], signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return said, left

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
    mesh_downs.going_down(mesh.run_dir.name, lambda: mesh.down(in_process=True))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
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


def envoy_counters(mesh: Mesh, pattern: str) -> dict[str, int]:
    """The gateway's counters whose names match the regex `pattern` (Envoy's admin
    `/stats?filter=`): name -> value."""
    import urllib.parse
    import urllib.request
    port = mesh.config["envoy"]["admin_port"]
    text = urllib.request.urlopen(
        f"http://127.0.0.1:{port}/stats?filter={urllib.parse.quote(pattern)}",
        timeout=10).read().decode()
    return {k: int(v) for k, v in (line.split(": ", 1) for line in text.splitlines())
            if v.strip().isdigit()}


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
