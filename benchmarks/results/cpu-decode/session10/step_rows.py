import sys, time, torch, numpy as np
sys.path.insert(0, "tests")
from unit.test_cpu_decode_kernel import step_inputs, caches, native, BLOCK
from llmesh.mesh.default_model import resolve_model
from llmesh.services.executor.weights import load_model
from llmesh.services.executor.cpu_decode_step import CpuDecodeStep
torch.set_flush_denormal(len(sys.argv) > 3)
model = load_model(resolve_model("bench"), "float32")
rows = int(sys.argv[1]); ctx = int(sys.argv[2])
ids, starts, counts, table, blocks = step_inputs([ctx] * rows)
kv = caches(model, blocks, torch.float32)
step = CpuDecodeStep(model, kv, BLOCK)
t = time.perf_counter()
for _ in range(300): native(step, ids, starts, counts, table, threads=1)
print((time.perf_counter() - t) / 300 * 1e3, "ms")
