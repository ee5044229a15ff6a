# kernel forward alone: threads=1 without helper, threads=1 with helper, OpenMP 2 threads
import os, sys, time, statistics, torch, numpy as np
from llmesh.mesh.default_model import resolve_model
from llmesh.services.executor.weights import load_model
from llmesh.services.executor.runner import ModelRunner
from llmesh.services.executor.attention import metadata_from_arrays
from llmesh.services.executor import cpu_decode_step as S
name = os.environ.get("MODEL", "bench")
m = load_model(resolve_model(name), "bfloat16")
r = ModelRunner(m, int(os.environ.get("BLOCKS", 512)), 16)
c = m.config
B = int(sys.argv[1]) if len(sys.argv) > 1 else 1
ctx = int(os.environ.get("CTX", 200))
nblk = -(-(ctx + 1) // 16)
table = np.array([list(range(b * nblk + 1, b * nblk + 1 + nblk)) for b in range(B)], np.int64)
meta = metadata_from_arrays(np.full(B, ctx, np.int64), np.ones(B, np.int64), table, 16, None, torch.device("cpu"), with_block_tables=True)
ids = torch.randint(3, c.vocab_size - 1, (B,))
os.environ["LLMESH_CPU_DECODE_HELPER"] = "0"; k0 = S.CpuDecodeStep(m, r.kv_caches, 16).kernel
os.environ["LLMESH_CPU_DECODE_HELPER"] = "1"; k1 = S.CpuDecodeStep(m, r.kv_caches, 16).kernel
def run(k, nt): return k.run(ids, meta.positions, meta.slot_mapping, meta.single_block_tables, meta.single_context_lens, nt)
a, b = run(k0, 1), run(k1, 1)
print("equal outputs:", torch.equal(a, b))
def t(f, n=100):
    for _ in range(10): f()
    ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return 1e3 * statistics.median(ts)
for rnd in range(2):
    print(f"{name} B={B}: 1 thread {t(lambda: run(k0, 1)):.3f} ms | 1 + helper {t(lambda: run(k1, 1)):.3f} ms | omp 2 {t(lambda: run(k0, 2)):.3f} ms; helper stats {k1.stats()}")
