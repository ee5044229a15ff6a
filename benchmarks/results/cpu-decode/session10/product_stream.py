import time, torch, numpy as np
from llmesh.kernels import cpu_decode
for in_ in (512, 1536):
    w = torch.randn(128 * 1024 * 1024 // 4 // in_, in_)
    for rows in (1, 2, 3, 4, 8):
        x = torch.randn(rows, in_)
        ts = []
        for _ in range(10):
            t = time.perf_counter(); cpu_decode.product(w, None, w.shape[0], x, 1); ts.append(time.perf_counter() - t)
        print(f"in {in_} rows {rows}: {np.median(ts)*1e3:.2f} ms ({w.numel()*4/np.median(ts)/1e9:.1f} GB/s)")
