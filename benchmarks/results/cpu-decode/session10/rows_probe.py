"""The float32 decode kernel against the eager float32 forward (each with its LM head) at
8-256 decode rows of 100-400-token contexts, one and two threads: where the kernel's row
limit should sit for float32. Usage: rows_probe.py bench|smollm2 [ROWS ...] (default 8 16 32 64)"""
import sys
import time

import numpy as np
import torch

sys.path.insert(0, "tests")
from unit.test_cpu_decode_kernel import BLOCK, caches, eager, native, step_inputs  # noqa: E402
from llmesh.mesh.default_model import resolve_model  # noqa: E402
from llmesh.services.executor import cpu_decode_step  # noqa: E402
from llmesh.services.executor.weights import load_model  # noqa: E402

cpu_decode_step.MAX_ROWS = 256  # (the probe's kernels hold up to 256 rows)

name = sys.argv[1]
model = load_model(resolve_model(name), "float32")
rng = np.random.default_rng(0)
for rows in [int(r) for r in (sys.argv[2:] or (8, 16, 32, 64))]:
    ids, starts, counts, table, blocks = step_inputs(rng.integers(100, 400, rows).tolist())
    kv = caches(model, blocks, torch.float32)
    step = cpu_decode_step.CpuDecodeStep(model, kv, BLOCK)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        tk, te = [], []
        for _ in range(7):
            t = time.perf_counter()
            step.logits(native(step, ids, starts, counts, table, threads=threads))
            tk.append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.inference_mode():
                model.compute_logits(eager(model, ids, starts, counts, table, kv))
            te.append(time.perf_counter() - t)
        print(f"{name} f32 rows {rows} threads {threads}: kernel {np.median(tk) * 1e3:.2f} ms, "
              f"eager {np.median(te) * 1e3:.2f} ms", flush=True)
