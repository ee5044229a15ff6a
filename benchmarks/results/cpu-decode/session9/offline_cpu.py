"""Probe: per-process CPU during the offline bench workload (64 chat requests at once,
token ids, greedy, ignore EOS) through a bfloat16 mesh over gRPC (Envoy in front).
Usage: python offline_cpu.py [bench|smollm2]"""
import os
import sys
import threading
import time

import grpc

from llmesh.benchmarks import kit
from llmesh.benchmarks.workload import chat
from llmesh.mesh.default_model import resolve_model
from llmesh.services.executor.model_config import load_model_config
from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

TCK = os.sysconf("SC_CLK_TCK")


def ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


model = resolve_model(sys.argv[1] if len(sys.argv) > 1 else "bench")
mc = load_model_config(model)
reqs = chat(mc.vocab_size, 2048, 0, 1024, 512, mc.bos_token_id or 0).take(64)
with kit.BenchMesh(model, engine={"dtype": "bfloat16"}) as mesh:
    pids = dict(mesh.pids())
    pids["client"] = os.getpid()
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(mesh.endpoint))
    sch = scheduler_pb2_grpc.SchedulerStub(grpc.insecure_channel(mesh.schedulers[0]))
    counts = []

    def one(r):
        req = inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=r.prompt_token_ids),
            sampling=common_pb2.SamplingParams(max_tokens=r.max_tokens, temperature=0,
                                               ignore_eos=True))
        counts.append(sum(len(m.token_ids) if hasattr(m, "token_ids") else 1
                          for m in stub.Generate(req, timeout=300)))

    spy = os.environ.get("SPY")  # py-spy (its path) of the executor during the first round
    for rnd in range(2):  # (the first warms up)
        if spy and rnd == 0:
            import subprocess
            spies = subprocess.Popen([spy, "record", "-p", str(pids["executor-0-0"]), "-r", "200",
                                      "-d", "6", "-f", "raw", "--threads", "--idle", "-o",
                                      "/tmp/s9/spy-executor.txt", "--nonblocking"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        t0 = {k: ticks(p) for k, p in pids.items()}
        s0 = sch.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
        w0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(r,)) for r in reqs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - w0
        t1 = {k: ticks(p) for k, p in pids.items()}
        s1 = sch.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
        print(f"  steps {s1.num_steps - s0.num_steps}, forward {s1.forward_s - s0.forward_s:.2f} s, "
              f"sample {s1.sample_s - s0.sample_s:.2f} s, schedule {s1.schedule_s - s0.schedule_s:.2f} s")
        n = sum(r.max_tokens for r in reqs)
        print(f"round {rnd}: {n} tokens in {wall:.2f} s: {n / wall:.0f} tok/s")
        for k in pids:
            cpu = (t1[k] - t0[k]) / TCK
            print(f"  {k:30s} {100 * cpu / wall:5.1f}% of a core, {cpu:.2f} s CPU")
