"""`llmesh down` against a supervisor that does not stop: after --timeout it kills the
supervisor, its process group and every pid it last wrote, and says so (exit 1)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import yaml

from mesh_fixture import ROOT, _alive, wait_until

# A stand-in supervisor: ignores SIGTERM, runs one child in its own process group and
# one in a session of its own (reachable only through the pids in state.json).
HUNG = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    grouped = subprocess.Popen(sleep)
    apart = subprocess.Popen(sleep, start_new_session=True)
    run_dir = sys.argv[1]
    with open(os.path.join(run_dir, "state.json.tmp"), "w") as f:
        json.dump({"status": "ready", "supervisor_pid": os.getpid(),
                   "pids": {"grouped": grouped.pid, "apart": apart.pid}}, f)
    os.replace(os.path.join(run_dir, "state.json.tmp"), os.path.join(run_dir, "state.json"))
    time.sleep(120)
""")


def test_down_kills_a_supervisor_that_does_not_stop_and_what_it_ran(tmp_path):
    config = tmp_path / "mesh.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path)}))
    sup = subprocess.Popen([sys.executable, "-c", HUNG, str(tmp_path)], start_new_session=True)
    pids = {"supervisor": sup.pid}
    try:
        assert wait_until(lambda: (tmp_path / "state.json").exists(), 30)
        pids.update(json.loads((tmp_path / "state.json").read_text())["pids"])
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "llmesh.mesh.cli", "down", "--config", str(config),
                              "--timeout", "1"], capture_output=True, text=True, timeout=60,
                             cwd=ROOT)
        assert time.monotonic() - t0 < 30
        assert out.returncode == 1, out.stdout + out.stderr
        assert "did not stop in 1 s" in out.stderr and "2 processes" in out.stderr
        sup.wait(10)  # (our child: reaped here)
        assert wait_until(lambda: not any(_alive(p) for p in pids.values()), 10), \
            [n for n, p in pids.items() if _alive(p)]
    finally:
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        sup.wait(10)
