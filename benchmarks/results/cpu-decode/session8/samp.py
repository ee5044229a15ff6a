import time, statistics, torch, numpy as np
from llmesh.mesh.default_model import resolve_model
from llmesh.services.executor.weights import load_model
torch.set_num_threads(1)
m = load_model(resolve_model("bench"), "bfloat16")
h = torch.randn(1, m.config.hidden_size).bfloat16()
idx = torch.zeros(1, dtype=torch.int64)
def t(f, n=300):
    with torch.inference_mode():
        for _ in range(20): f()
        ts = []
        for _ in range(n):
            s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return 1e3 * statistics.median(ts)
print("index", t(lambda: h[idx]))
print("compute_logits", t(lambda: m.compute_logits(h)))
lg = m.compute_logits(h)
print("logits dtype", lg.dtype, lg.shape)
print("argmax.tolist", t(lambda: lg.argmax(dim=-1).tolist()))
print("all", t(lambda: m.compute_logits(h[idx]).argmax(dim=-1).tolist()))
import cProfile, pstats
with torch.inference_mode():
    pr = cProfile.Profile(); pr.enable()
    for _ in range(300): m.compute_logits(h[idx]).argmax(dim=-1).tolist()
    pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(12)
