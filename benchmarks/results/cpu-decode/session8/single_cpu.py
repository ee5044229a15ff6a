# per-process CPU per token during a single stream through a bf16 bench mesh
import os, sys, time, grpc, statistics
from llmesh.benchmarks import kit
from llmesh.mesh.default_model import resolve_model
from llmesh.v1 import inference_pb2, inference_pb2_grpc, common_pb2
TCK = os.sysconf("SC_CLK_TCK")
def ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])
model = sys.argv[1] if len(sys.argv) > 1 else "bench"
with kit.BenchMesh(resolve_model(model), engine={"dtype": "bfloat16", "pipeline_depth": int(os.environ.get("DEPTH", 2))}) as mesh:
    pids = dict(mesh.pids()); pids["client"] = os.getpid()
    if os.environ.get("PIN"):
        for k, p in pids.items():
            if not k.startswith("executor"):
                for t in os.listdir(f"/proc/{p}/task"):
                    os.sched_setaffinity(int(t), {1})
        print("pinned all but the executor to cpu 1")
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(mesh.endpoint))
    def run(n):
        req = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[1] + list(range(5, 105))),
              sampling=common_pb2.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        ts = [time.perf_counter() for r in stub.Generate(req, timeout=120)]
        return ts
    run(16)
    import subprocess
    spies = [subprocess.Popen(["/tmp/s8/spyenv/bin/py-spy", "record", "-p", str(pids[k]), "-r", "500", "-d", "1.5", "-f", "raw", "--threads", "--idle", "-o", f"/tmp/s8/spy-{k}.txt", "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for k in os.environ.get("SPY", "").split(",") if k]
    time.sleep(0.5 if spies else 0)
    t0 = {k: ticks(p) for k, p in pids.items()}; w0 = time.perf_counter(); n = 0; itl = []
    for _ in range(4):
        ts = run(256); n += 256; itl += [b - a for a, b in zip(ts[1:], ts[2:])]
    wall = time.perf_counter() - w0
    for sp in spies: sp.wait()
    t1 = {k: ticks(p) for k, p in pids.items()}
    print(f"{model}: ITL median {1e3*statistics.median(itl):.2f} ms, wall/token {1e3*wall/n:.2f}")
    for k in pids:
        cpu = (t1[k] - t0[k]) / TCK
        print(f"  {k:30s} {100*cpu/wall:5.1f}% of a core, {1e3*cpu/n:.3f} ms CPU/token")
