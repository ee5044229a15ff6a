"""Probe: decode attention for many rows, per layer call: the compiled paged_decode
(attention_cpu.py) against the C++ decode_attention, bench shapes (8 heads over 4
KV heads of 64) on a bfloat16 cache, rows of mixed contexts; medians of 30 calls.
Usage: python decode_attention_probe.py"""
import statistics
import time

import torch

from llmesh.kernels import cpu_decode
from llmesh.services.executor.attention_cpu import CompiledCpuAttention, paged_decode

torch.manual_seed(0)
H, KVH, D, BS, BLOCKS = 8, 4, 64, 16, 4096
k = (torch.randn(BLOCKS, BS, KVH, D) * 0.5).bfloat16()
v = torch.randn(BLOCKS, BS, KVH, D).bfloat16()
backend = CompiledCpuAttention()
backend.warm_up(k, v, H, D ** -0.5)


def case(rows, lo, hi):
    g = torch.Generator().manual_seed(rows)
    lens = torch.randint(lo, hi, (rows,), generator=g)
    width = int((lens.max() + BS - 1) // BS)
    perm = torch.randperm(BLOCKS, generator=g)[:rows * width].view(rows, width)
    q = torch.randn(rows, H, D, generator=g).bfloat16()
    return q, perm.int(), lens.int()


def t(f, n=30):
    for _ in range(3):
        f()
    ts = []
    for _ in range(n):
        s = time.perf_counter()
        f()
        ts.append(time.perf_counter() - s)
    return 1e3 * statistics.median(ts)


for rows, lo, hi in ((9, 100, 700), (16, 100, 700), (32, 100, 700), (48, 100, 700),
                     (64, 100, 700), (64, 20, 200), (32, 600, 1500)):
    q, tables, lens = case(rows, lo, hi)
    ref = paged_decode(q.float(), k.float(), v.float(), tables.long(), lens.long(), D ** -0.5)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        comp = backend._single(q, k, v, tables, lens, D ** -0.5)
        nat = cpu_decode.decode_attention(q, k, v, tables, lens, D ** -0.5, threads)
        tc = t(lambda: backend._single(q, k, v, tables, lens, D ** -0.5))
        tn = t(lambda: cpu_decode.decode_attention(q, k, v, tables, lens, D ** -0.5, threads))
        print(f"rows {rows:3d} ctx {lo}-{hi} threads {threads}: compiled {tc:.3f} ms, C++ {tn:.3f} ms "
              f"({tc / tn:.2f}x); max|err| vs float32: compiled {(comp.float() - ref).abs().max():.4f} "
              f"C++ {(nat.float() - ref).abs().max():.4f}")
