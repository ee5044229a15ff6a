# TTFT through the bf16 bench mesh (gRPC via Envoy) for prompts of 1, 101, 512 tokens; medians of 7
import os, sys, time, grpc, statistics
from llmesh.benchmarks import kit
from llmesh.mesh.default_model import resolve_model
from llmesh.v1 import inference_pb2, inference_pb2_grpc, common_pb2, scheduler_pb2, scheduler_pb2_grpc
with kit.BenchMesh(resolve_model(sys.argv[1] if len(sys.argv) > 1 else "bench"), engine={"dtype": "bfloat16"}) as mesh:
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(mesh.endpoint))
    sch = scheduler_pb2_grpc.SchedulerStub(grpc.insecure_channel(mesh.schedulers[0]))
    def ttft(n, salt):
        ids = [1] + [(salt * 7919 + 13 * j) % 3000 + 5 for j in range(n - 1)]
        req = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=ids),
              sampling=common_pb2.SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        t0 = time.perf_counter()
        for r in stub.Generate(req, timeout=60):
            return 1e3 * (time.perf_counter() - t0)
    for n in (1, 101, 512):
        ttft(n, 999)
        s0 = sch.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
        xs = [ttft(n, i + n) for i in range(7)]
        s1 = sch.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
        steps = max(1, s1.num_steps - s0.num_steps)
        print(f"prompt {n}: TTFT median {statistics.median(xs):.1f} ms ({' '.join(f'{x:.1f}' for x in xs)}); per request: forward {1e3*(s1.forward_s-s0.forward_s)/7:.1f} sample {1e3*(s1.sample_s-s0.sample_s)/7:.1f} schedule {1e3*(s1.schedule_s-s0.schedule_s)/7:.1f} ms, steps {steps/7:.1f}")
