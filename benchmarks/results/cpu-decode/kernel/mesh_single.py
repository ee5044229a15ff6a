# Single stream through a bfloat16 bench-model mesh: the scheduler's per-step stats (the executor's forward and sampling, the loop's wait) against the stream's inter-token time; argv[1] = kernel | eager
# single stream through a bench mesh (bf16): inter-token time vs the executor's forward+sample per step
import sys, time, grpc, statistics
from llmesh.benchmarks import kit
from llmesh.mesh.default_model import resolve_model
from llmesh.v1 import inference_pb2, inference_pb2_grpc, common_pb2, scheduler_pb2, scheduler_pb2_grpc
kernel = sys.argv[1] == "kernel"
with kit.BenchMesh(resolve_model("bench"), engine={"dtype": "bfloat16", "cpu_decode_kernel": kernel}) as mesh:
    ch = grpc.insecure_channel(mesh.endpoint); stub = inference_pb2_grpc.InferenceStub(ch)
    sch = scheduler_pb2_grpc.SchedulerStub(grpc.insecure_channel(mesh.schedulers[0]))
    def run(n):
        req = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[1] + list(range(5, 105))),
              sampling=common_pb2.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        ts = []
        for r in stub.Generate(req, timeout=60):
            ts.append(time.perf_counter())
        return ts
    run(16)
    s0 = sch.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
    itls = []
    t0 = time.perf_counter()
    for _ in range(6):
        ts = run(256); itls += [b - a for a, b in zip(ts[1:], ts[2:])]
    wall = time.perf_counter() - t0
    s1 = sch.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
    steps = s1.num_steps - s0.num_steps
    print(f"kernel={kernel}: ITL median {1e3*statistics.median(itls):.2f} ms; per step: forward {1e3*(s1.forward_s-s0.forward_s)/steps:.2f} sample {1e3*(s1.sample_s-s0.sample_s)/steps:.2f} schedule {1e3*(s1.schedule_s-s0.schedule_s)/steps:.2f} exec_rpc_wait {1e3*(s1.executor_rpc_s-s0.executor_rpc_s)/steps:.2f}; wall/step {1e3*wall/steps:.2f}")
# the LM head alone (bench model and SmolLM2), one row, 1 and 2 threads
import time as _t, torch as _torch
from llmesh.services.executor.weights import load_model as _load
for _name in ("bench", "smollm2"):
    _m = _load(resolve_model(_name), "bfloat16")
    _h = _torch.randn(1, _m.config.hidden_size).bfloat16()
    for _nt in (1, 2):
        _torch.set_num_threads(_nt)
        with _torch.inference_mode():
            for _ in range(20): _m.compute_logits(_h)
            _ts = []
            for _ in range(200):
                _s = _t.perf_counter(); _m.compute_logits(_h).argmax(-1).tolist(); _ts.append(_t.perf_counter() - _s)
        print(f"LM head {_name}, {_nt} thread(s): {1e3*statistics.median(_ts):.3f} ms")
