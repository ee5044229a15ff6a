import sys, time, torch, numpy as np
sys.path.insert(0, "tests")
from unit.test_cpu_decode_kernel import step_inputs, caches, native, eager, BLOCK
from llmesh.mesh.default_model import resolve_model
from llmesh.services.executor.weights import load_model
from llmesh.services.executor.cpu_decode_step import CpuDecodeStep
name = sys.argv[1]
model = load_model(resolve_model(name), "float32")
for rows in (1, 2, 4, 8):
    ids, starts, counts, table, blocks = step_inputs([256 + 7 * i for i in range(rows)])
    kv = caches(model, blocks, torch.float32)
    step = CpuDecodeStep(model, kv, BLOCK)
    for threads in (1, 2):
        ts, te = [], []
        torch.set_num_threads(threads)
        for _ in range(15):
            t = time.perf_counter(); h = native(step, ids, starts, counts, table, threads=threads); step.logits(h); ts.append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.inference_mode():
                model.compute_logits(eager(model, ids, starts, counts, table, kv))
            te.append(time.perf_counter() - t)
        print(f"{name} f32 rows {rows} threads {threads}: kernel {np.median(ts)*1e3:.2f} ms, eager {np.median(te)*1e3:.2f} ms", flush=True)
