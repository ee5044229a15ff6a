import time, torch, torch.nn.functional as F, sys
from llmesh.kernels import cpu_decode
torch.set_num_threads(2)
def med(f, n=15):
    for _ in range(3): f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return 1e3 * sorted(ts)[n // 2]
for (L, H, KVH, D) in [(512, 9, 3, 64), (512, 8, 4, 64)]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, D, generator=g) for n, h in ((L, H), (L, KVH), (L, KVH)))
    sd = lambda q, k, v: F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True, scale=D ** -0.5, enable_gqa=True)
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        qq, kk, vv = q.to(dt), k.to(dt), v.to(dt)
        print(f"L{L} H{H} KVH{KVH} D{D} {name}: kernel 2 threads {med(lambda: cpu_decode.prefill_attention(qq, kk, vv, D ** -0.5, 2)):.2f} ms, 1 thread {med(lambda: cpu_decode.prefill_attention(qq, kk, vv, D ** -0.5, 1)):.2f}, SDPA {med(lambda: sd(qq, kk, vv)):.2f} ms")
