"""The paged decode kernel against the memory roofline and torch SDPA on contiguous
K/V (GPU).

    llmesh bench kernels [--batches 1,16,64,256] [--contexts 1024,4096,16384]
                         [--head-dims 64,128] [--json OUT]

For each (head dim, batch, context): K and V of every context token in a paged
cache (blocks in a random order, as a running engine leaves them), one query
token per sequence with GQA (`--kv-heads`, `--group`). Timed with CUDA events
around each call (median of `--reps` after a warm-up): `ops.paged_decode_attention`
as the engine calls it, and torch SDPA over contiguous K/V of the same shapes.
share = (K + V bytes) / time / the device's measured copy rate (read + write of a
1 GiB buffer). The host time per call (launch path included) is the wall time
of `--reps` back-to-back calls with one sync at the end. The first cases are
checked against the torch reference (max abs error reported).
"""
from __future__ import annotations

import shlex
import statistics
import sys
import time

from llmesh.benchmarks import kit


def options(p) -> None:
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--contexts", default="1024,4096,16384")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--group", type=int, default=4, help="query heads per KV head")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--max-gib", type=float, default=24.0,
                   help="skip cases whose K/V cache is larger than this")


def run(args) -> dict:
    """The report, also written to --json after each case."""
    import torch
    if not torch.cuda.is_available():
        raise ValueError("bench kernels: needs a CUDA device")
    return run_kernel_bench(args, on_update=(lambda r: kit.write_json(r, args.json))
                            if args.json else None)


def _time_calls(fn, reps: int) -> tuple[float, float]:
    """(median device seconds per call from CUDA events, host seconds per call)."""
    import torch
    fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for a, b in events:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    device_s = statistics.median(a.elapsed_time(b) / 1e3 for a, b in events)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    host_s = (time.perf_counter() - t0) / reps
    torch.cuda.synchronize()
    return device_s, host_s


def run_kernel_bench(args, on_update=None) -> dict:
    import torch

    from llmesh.benchmarks import machine
    dtype = getattr(torch, args.dtype)
    copy = machine.measure_memory_bandwidth(2**30, device="cuda")
    report = {"kind": "llmesh-bench-kernels", "gpu": torch.cuda.get_device_name(),
              "dtype": args.dtype, "kv_heads": args.kv_heads, "group": args.group,
              "block_size": args.block_size, "copy_bytes_per_s": copy["bytes_per_s"],
              **kit.stamp(shlex.join(["llmesh", *sys.argv[1:]])), "rows": []}
    checked = 0
    for head_dim in (int(x) for x in args.head_dims.split(",")):
        for batch in (int(x) for x in args.batches.split(",")):
            for ctx in (int(x) for x in args.contexts.split(",")):
                kv_bytes = 2 * batch * ctx * args.kv_heads * head_dim * dtype.itemsize
                if kv_bytes > args.max_gib * 2**30:
                    continue
                check = checked < 6 and batch * ctx <= 64 * 4096
                checked += check
                row = _measure(args, dtype, head_dim, batch, ctx, check)
                row["kv_bytes"] = kv_bytes
                for name in ("paged", "sdpa"):
                    row[f"{name}_share"] = kv_bytes / row[f"{name}_s"] / copy["bytes_per_s"]
                report["rows"].append(row)
                torch.cuda.empty_cache()
                kit.log(f"[bench kernels] d{head_dim} b{batch} ctx{ctx}: paged "
                        f"{1e6 * row['paged_s']:.1f} us ({100 * row['paged_share']:.1f}%), sdpa "
                        f"{1e6 * row['sdpa_s']:.1f} us ({100 * row['sdpa_share']:.1f}%), host "
                        f"{1e6 * row['paged_host_s']:.1f} us")
                if on_update:
                    on_update(report)
    return report


def _measure(args, dtype, head_dim: int, batch: int, ctx: int, check: bool) -> dict:
    """One case: the paged kernel (and, if `check`, its error against the reference),
    then SDPA over contiguous K/V of the same shapes (each cache freed on return)."""
    import torch

    from llmesh.kernels import ops
    from llmesh.kernels.reference import paged_decode_attention_ref
    bs, kvh = args.block_size, args.kv_heads
    blocks_per_seq = -(-ctx // bs)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, bs, kvh, head_dim, dtype=dtype, device="cuda")
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, blocks_per_seq)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, kvh * args.group, head_dim, dtype=dtype, device="cuda")
    scale = head_dim ** -0.5

    def paged():
        return ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale,
                                          max_context=ctx)
    row = {"head_dim": head_dim, "batch": batch, "context": ctx}
    if check:
        ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale)
        row["max_abs_err"] = float((paged().float() - ref.float()).abs().max())
    row["paged_s"], row["paged_host_s"] = _time_calls(paged, args.reps)
    return {**row, "sdpa_s": _sdpa(q, batch, kvh, ctx, head_dim, dtype, scale, args.reps)}


def _sdpa(q, batch, kvh, ctx, head_dim, dtype, scale, reps) -> float:
    import torch
    import torch.nn.functional as F
    kc = torch.randn(batch, kvh, ctx, head_dim, dtype=dtype, device="cuda")
    vc = torch.randn_like(kc)
    q4 = q.view(batch, q.shape[1], 1, head_dim)
    return _time_calls(lambda: F.scaled_dot_product_attention(
        q4, kc, vc, scale=scale, enable_gqa=True), reps)[0]


def markdown(report) -> str:
    return "\n".join([
        f"## llmesh bench kernels: paged decode, {report['dtype']} on {report['gpu']}", "",
        f"{report['kv_heads']} KV heads x group {report['group']}, block "
        f"{report['block_size']}; share of the measured copy rate "
        f"{report['copy_bytes_per_s'] / 1e12:.3g} TB/s", "",
        kit.md_table(["head dim", "batch", "context", "paged", "share", "host/call",
                      "SDPA contiguous", "share"],
                     [[r["head_dim"], r["batch"], r["context"], f"{1e6 * r['paged_s']:.1f} us",
                       f"{100 * r['paged_share']:.1f}%", f"{1e6 * r['paged_host_s']:.1f} us",
                       f"{1e6 * r['sdpa_s']:.1f} us", f"{100 * r['sdpa_share']:.1f}%"]
                      for r in report["rows"]], "r" * 8)]) + "\n"


SPEC = kit.Spec("gpu_kernels", __doc__, options, run, model=None, table=markdown)

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
