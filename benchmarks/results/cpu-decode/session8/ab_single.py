# Two bf16 meshes side by side (env at their start), single 256-token streams alternating; used for the helper, plan_first and pipeline-depth A/Bs
# Two bf16 meshes side by side (A: env ENV_A, B: env ENV_B), single 256-token streams alternating between them;
# medians of per-stream median inter-token times. Usage: ab_single.py MODEL ROUNDS "K=V ..." "K=V ..."
import os, sys, time, grpc, statistics, contextlib
from llmesh.benchmarks import kit
from llmesh.mesh.default_model import resolve_model
from llmesh.v1 import inference_pb2, inference_pb2_grpc, common_pb2
model, rounds = sys.argv[1], int(sys.argv[2])
envs = [dict(kv.split("=", 1) for kv in a.split()) for a in sys.argv[3:5]]
def stream(stub, n):
    req = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[1] + list(range(5, 105))),
          sampling=common_pb2.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    ts = [time.perf_counter() for r in stub.Generate(req, timeout=120)]
    return [b - a for a, b in zip(ts[1:], ts[2:])], ts
with contextlib.ExitStack() as stack:
    stubs = []
    for env in envs:
        env = dict(env)
        eng_keys = {k: v for k, v in env.items() if k.startswith("engine.")}
        env = {k: v for k, v in env.items() if not k.startswith("engine.")}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        env.update(eng_keys)
        eng = {"dtype": "bfloat16"}
        for k in [k for k in env if k.startswith("engine.")]:
            eng[k.split(".", 1)[1]] = int(env.pop(k))
        mesh = stack.enter_context(kit.BenchMesh(resolve_model(model), engine=eng))
        for k, v in saved.items():
            if v is None: os.environ.pop(k)
            else: os.environ[k] = v
        stubs.append(inference_pb2_grpc.InferenceStub(grpc.insecure_channel(mesh.endpoint)))
    for s in stubs: stream(s, 32)
    res = [[], []]
    for r in range(rounds):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            itl, ts = stream(stubs[i], 256)
            res[i].append(1e3 * statistics.median(itl))
    for i, a in enumerate(sys.argv[3:5]):
        print(f"{model} [{a}]: per-stream median ITL ms {' '.join(f'{x:.2f}' for x in res[i])} -> median {statistics.median(res[i]):.2f}")
    print("ratio A/B per round:", " ".join(f"{a/b:.2f}" for a, b in zip(*res)))
