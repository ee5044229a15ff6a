"""One 900 req/s h2load flood (10 s) with Envoy's admin counters read after it."""
import json, sys, time, urllib.request, collections
from pathlib import Path
from llmesh.benchmarks import h2load, kit
from llmesh.mesh.default_model import resolve_model
gw = float(sys.argv[1]) if len(sys.argv) > 1 else 0
rate = float(sys.argv[2]) if len(sys.argv) > 2 else 900
with kit.BenchMesh(resolve_model("tiny"), engine={"num_kv_blocks": 256, "enable_prefix_caching": False},
                   envoy={"max_requests_per_s": gw}) as mesh:
    body = {"prompt": [0] + [7 * j % 2900 + 5 for j in range(40)], "max_tokens": 64, "stream": True,
            "priority": "interactive"}
    proc, log = h2load.start(f"http://{mesh.endpoint}/v1/completions", body, rate, 10, {}, mesh.run_dir)
    rows, rep = h2load.finish(proc, log, 400)
    print(collections.Counter(r["status"] for r in rows))
    # when the 503s came, and how long they took
    bad = [r for r in rows if r["status"] == 503]
    if bad:
        print("503 start s: first %.2f last %.2f; ms p50 %.0f max %.0f" % (bad[0]["start"], bad[-1]["start"],
              sorted(r["ms"] for r in bad)[len(bad)//2], max(r["ms"] for r in bad)))
    admin = mesh.cfg.envoy.admin_port
    stats = urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats", timeout=10).read().decode()
    for line in stats.splitlines():
        name, _, v = line.partition(": ")
        if v.strip() not in ("0", "") and any(k in name for k in (
                "overflow", "no_healthy", "rate_limited", "upstream_rq_5", "upstream_rq_4", "rq_timeout",
                "health_check.failure", "health_check.network_failure", "membership_healthy", "upstream_rq_retry",
                "upstream_cx_destroy_remote_with_active_rq", "upstream_rq_pending_failure_eject", "downstream_rq_5",
                "ejections_active", "outlier", "cx_connect_fail", "rq_reset", "cx_protocol_error", "rq_error")):
            print(line)
    rd = Path(mesh.run_dir)
    for f in sorted(rd.glob("*.log")):
        txt = f.read_text(errors="replace").splitlines()
        errs = [l for l in txt if "ERROR" in l or "Traceback" in l or "503" in l or "UNAVAILABLE" in l]
        if errs:
            print("==", f.name, len(errs)); print("\n".join(errs[:8]))
    by = collections.defaultdict(list)
    for r in rows:
        if r["status"] == 429:
            by[int(r["start"])].append(r["ms"])
    for sec in sorted(by):
        v = sorted(by[sec]); print(f"t={sec}s refusals {len(v)} p50 {v[len(v)//2]:.0f} ms p90 {v[int(len(v)*.9)]:.0f} max {v[-1]:.0f}")
    import subprocess
    print(subprocess.run(["ps", "-eo", "pid,pcpu,cputime,comm,args", "--sort=-pcpu"], capture_output=True, text=True).stdout[:1500])
