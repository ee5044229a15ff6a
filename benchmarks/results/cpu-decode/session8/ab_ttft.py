# Two bf16 meshes side by side (env A / env B at start), TTFT of fresh prompts alternating between them.
# Usage: ab_ttft.py MODEL ROUNDS "K=V" "K=V"
import os, sys, time, grpc, statistics, contextlib
from llmesh.benchmarks import kit
from llmesh.mesh.default_model import resolve_model
from llmesh.v1 import inference_pb2, inference_pb2_grpc, common_pb2
model, rounds = sys.argv[1], int(sys.argv[2])
envs = [dict(kv.split("=", 1) for kv in a.split()) for a in sys.argv[3:5]]
with contextlib.ExitStack() as stack:
    stubs = []
    for env in envs:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        mesh = stack.enter_context(kit.BenchMesh(resolve_model(model), engine={"dtype": "bfloat16"}))
        for k, v in saved.items():
            if v is None: os.environ.pop(k)
            else: os.environ[k] = v
        stubs.append(inference_pb2_grpc.InferenceStub(grpc.insecure_channel(mesh.endpoint)))
    def ttft(stub, n, salt):
        ids = [1] + [(salt * 7919 + 13 * j) % 3000 + 5 for j in range(n - 1)]
        req = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=ids),
              sampling=common_pb2.SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        t0 = time.perf_counter()
        for r in stub.Generate(req, timeout=60):
            return 1e3 * (time.perf_counter() - t0)
    for n in (101, 512):
        for s in stubs: ttft(s, n, 1)
        res = [[], []]
        for r in range(rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                res[i].append(ttft(stubs[i], n, 100 + r))
        for i, a in enumerate(sys.argv[3:5]):
            print(f"{model} prompt {n} [{a}]: TTFT ms median {statistics.median(res[i]):.1f} ({' '.join(f'{x:.1f}' for x in res[i])})")
