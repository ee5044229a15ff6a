"""In-process TTFT of a 512-token prompt (prefill + 1 token), and the prefill attention's
share: the Engine over a model in a dtype, 2 warm-up then 7 timed requests (medians)."""
import random, sys, time
from llmesh.mesh.default_model import resolve_model
from llmesh.services.engine.engine import Engine, EngineConfig
from llmesh.services.common.sampling_params import SamplingParams
model, dtype = sys.argv[1], sys.argv[2]
eng = Engine.from_pretrained(resolve_model(model), EngineConfig(dtype=dtype, max_num_batched_tokens=1024))
cls = type(eng.runner.backend)
T = [0.0]
orig = cls.attend_prefills
def timed(self, *a):
    t = time.perf_counter(); orig(self, *a); T[0] += time.perf_counter() - t
cls.attend_prefills = timed
rng = random.Random(0)
def once():
    p = [1] + rng.choices(range(3, 3000), k=511)
    T[0] = 0.0
    t = time.perf_counter(); eng.generate([p], SamplingParams(max_tokens=1, ignore_eos=True))
    return time.perf_counter() - t, T[0]
for _ in range(2): once()
rs = sorted(once() for _ in range(7))
att = sorted(a for _, a in rs)
print(f"{model} {dtype} backend {cls.__name__}: TTFT-512 median {1e3*rs[3][0]:.1f} ms, prefill attention median {1e3*att[3]:.1f} ms; runs {[round(1e3*a) for a, _ in rs]}")
eng.close()
