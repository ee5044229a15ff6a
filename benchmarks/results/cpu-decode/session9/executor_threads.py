"""Probe: CPU per token of each thread of the executor (and each process) during single
bfloat16 bench streams through the mesh (gRPC via Envoy, 4 x 256 tokens after a warm-up).
Usage: python executor_threads.py [bench|smollm2]"""
import os
import statistics
import sys
import time

import grpc

from llmesh.benchmarks import kit
from llmesh.mesh.default_model import resolve_model
from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

TCK = os.sysconf("SC_CLK_TCK")


def ticks(path):
    f = open(path).read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


def threads(pid):
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        name = open(f"/proc/{pid}/task/{t}/comm").read().strip()
        out[f"{name}({t})"] = ticks(f"/proc/{pid}/task/{t}/stat")
    return out


model = sys.argv[1] if len(sys.argv) > 1 else "bench"
with kit.BenchMesh(resolve_model(model), engine={"dtype": "bfloat16"}) as mesh:
    pids = dict(mesh.pids())
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(mesh.endpoint))

    def run(n):
        req = inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=[1] + list(range(5, 105))),
            sampling=common_pb2.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return [time.perf_counter() for _ in stub.Generate(req, timeout=120)]

    run(16)
    ex = pids["executor-0-0"]
    t0, p0 = threads(ex), {k: ticks(f"/proc/{p}/stat") for k, p in pids.items()}
    w0, n, itl = time.perf_counter(), 0, []
    for _ in range(4):
        ts = run(256)
        n += 256
        itl += [b - a for a, b in zip(ts[1:], ts[2:])]
    wall = time.perf_counter() - w0
    t1, p1 = threads(ex), {k: ticks(f"/proc/{p}/stat") for k, p in pids.items()}
    print(f"{model}: ITL median {1e3 * statistics.median(itl):.2f} ms, wall/token {1e3 * wall / n:.2f}")
    for k in pids:
        print(f"  {k:28s} {1e3 * (p1[k] - p0[k]) / TCK / n:.3f} ms CPU/token")
    print("  executor threads:")
    for k in t1:
        cpu = (t1[k] - t0.get(k, 0)) / TCK
        if cpu:
            print(f"    {k:28s} {1e3 * cpu / n:.3f} ms CPU/token")
