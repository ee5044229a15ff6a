"""Probe: single bfloat16 streams through one mesh, with every thread but the executor's
step thread (and its OpenMP workers) held to CPU 1 ("pinned": the step thread has CPU 0
to itself) against no affinity ("free"), alternating rounds of 4 x 256-token streams.
CLIENT=free leaves this (client) process's threads out of the pinning.
Usage: [CLIENT=free] python pin_probe.py [bench|smollm2] [rounds]"""
import os
import statistics
import sys
import time

import grpc

from llmesh.benchmarks import kit
from llmesh.mesh.default_model import resolve_model
from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

ALL = set(range(os.cpu_count()))


def ticks(path):
    f = open(path).read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


def tasks(pid):
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


model = sys.argv[1] if len(sys.argv) > 1 else "bench"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
with kit.BenchMesh(resolve_model(model), engine={"dtype": "bfloat16"}) as mesh:
    pids = dict(mesh.pids())
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(mesh.endpoint))

    def run(n):
        req = inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=[1] + list(range(5, 105))),
            sampling=common_pb2.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return [time.perf_counter() for _ in stub.Generate(req, timeout=120)]

    ex = pids["executor-0-0"]
    before = {t: ticks(f"/proc/{ex}/task/{t}/stat") for t in tasks(ex)}
    run(256)
    step = max(tasks(ex), key=lambda t: ticks(f"/proc/{ex}/task/{t}/stat") - before.get(t, 0))
    # the executor's OpenMP workers: threads that have run torch's two-thread ops (prefills)
    others = [(p, t) for k, p in pids.items() for t in tasks(p) if t != step] \
        + ([] if os.environ.get("CLIENT") == "free" else [(os.getpid(), t) for t in tasks(os.getpid())])

    def affinity(pinned: bool):
        for p, t in others:
            try:
                os.sched_setaffinity(t, {1} if pinned else ALL)
            except OSError:
                pass  # (a thread that ended)

    itl = {"free": [], "pinned": []}
    for r in range(2 * rounds):
        mode = ("free", "pinned")[(r + r // 2) % 2]
        affinity(mode == "pinned")
        for _ in range(4):
            ts = run(256)
            itl[mode].append(statistics.median(b - a for a, b in zip(ts[1:], ts[2:])))
    affinity(False)
    for mode, xs in itl.items():
        print(f"{model} {mode}: per-stream median ITL ms "
              f"{' '.join(f'{1e3 * x:.2f}' for x in xs)} -> median {1e3 * statistics.median(xs):.2f}")
