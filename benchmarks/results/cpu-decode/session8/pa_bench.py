import torch, time, statistics
import torch.nn.functional as F
from llmesh.kernels import cpu_decode
def t(f, n=20):
    for _ in range(3): f()
    ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return 1e3 * statistics.median(ts)
for (L, H, KVH, D) in ((512, 8, 4, 64), (101, 8, 4, 64), (512, 9, 3, 64), (2048, 8, 4, 64)):
    q = torch.randn(L, H, D).bfloat16(); k = torch.randn(L, KVH, D).bfloat16(); v = torch.randn(L, KVH, D).bfloat16()
    with torch.inference_mode():
        sd = t(lambda: F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True, scale=D ** -0.5, enable_gqa=True))
        kn = t(lambda: cpu_decode.prefill_attention(q, k, v, D ** -0.5, torch.get_num_threads()))
    print(f"L={L} H={H} KVH={KVH} D={D}: torch SDPA {sd:.2f} ms, kernel {kn:.2f} ms ({sd/kn:.2f}x), threads {torch.get_num_threads()}")
