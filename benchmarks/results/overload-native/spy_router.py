"""py-spy of the router (and scheduler) during a 300 req/s h2load flood."""
import subprocess, sys, time, collections
from pathlib import Path
from llmesh.benchmarks import h2load, kit
from llmesh.mesh.default_model import resolve_model
rate = float(sys.argv[1]) if len(sys.argv) > 1 else 300
SPY = "py-spy"  # (pip install py-spy; not a project dependency)
with kit.BenchMesh(resolve_model("tiny"), engine={"num_kv_blocks": 256, "enable_prefix_caching": False}) as mesh:
    pids = mesh.pids()
    print(pids)
    body = {"prompt": [0] + [7 * j % 2900 + 5 for j in range(40)], "max_tokens": 64, "stream": True,
            "priority": "interactive"}
    proc, log = h2load.start(f"http://{mesh.endpoint}/v1/completions", body, rate, 12, {}, mesh.run_dir)
    time.sleep(2)
    spies = []
    for name, pid in pids.items():
        if name.startswith(("router", "scheduler", "executor")):
            out = f"benchmarks/results/overload-native/spy-{name}.txt"
            spies.append(subprocess.Popen([SPY, "record", "-p", str(pid), "-d", "8", "-r", "200", "-f", "raw", "-o", out, "--nonblocking"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for s in spies: s.wait()
    rows, rep = h2load.finish(proc, log, 400)
    print(collections.Counter(r["status"] for r in rows))
