import os, time, torch, numpy as np, statistics
from llmesh.mesh.default_model import resolve_model
from llmesh.services.executor.weights import load_model
from llmesh.services.executor.runner import ModelRunner
from llmesh.services.executor.attention import metadata_from_arrays
name = os.environ.get("MODEL", "bench")
m = load_model(resolve_model(name), "bfloat16")
r = ModelRunner(m, 512, 16)
N = int(os.environ.get("N", 512))
nblk = -(-N // 16)
table = np.array([list(range(1, 1 + nblk))], np.int64)
meta = metadata_from_arrays(np.zeros(1, np.int64), np.array([N], np.int64), table, 16, None, torch.device("cpu"), with_block_tables=getattr(r.backend, "wants_block_tables", False))
ids = torch.randint(3, m.config.vocab_size - 1, (N,))
def fwd():
    with torch.inference_mode():
        return m(ids, meta.positions, r.kv_caches, meta, r.backend)
for _ in range(3): fwd()
ts = []
for _ in range(7):
    s = time.perf_counter(); fwd(); ts.append(time.perf_counter() - s)
print(f"{name} prefill {N}: {1e3*statistics.median(ts):.1f} ms, threads {torch.get_num_threads()}")
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(3): fwd()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
