"""The paged decode kernel against the memory roofline and torch SDPA on contiguous
K/V, and the paged prefill kernel against the tensor-core rate and the engine's
gather + SDPA path (GPU).

    llmesh bench kernels [--batches 1,16,64,256] [--contexts 1024,4096,16384]
                         [--head-dims 64,128,256] [--prefill 8192x1,2048x4] [--json OUT]

For each (head dim, batch, context): K and V of every context token in a paged
cache (blocks in a random order, as a running engine leaves them), one query
token per sequence with GQA (`--kv-heads`, `--group`). Timed with CUDA events
around each call (median of `--reps` after a warm-up): `ops.paged_decode_attention`
as the engine calls it, and torch SDPA over contiguous K/V of the same shapes.
share = (K + V bytes) / time / the device's measured copy rate (read + write of a
1 GiB buffer). The host time per call (launch path included) is the wall time
of `--reps` back-to-back calls with one sync at the end. The first cases are
checked against the torch reference (max abs error reported), two per head dim.

Prefill (`--prefill`, TOKENSxCHUNKS: that many new tokens split into that many
chunks, each after as many cached tokens as it has new ones, except a single chunk,
which starts from an empty cache): `ops.paged_prefill_attention` as the engine calls
it, checked against the reference backend's gather + SDPA per chunk, both timed;
FLOPs = 4 x heads x head_dim x (query, key) pairs a causal mask keeps, against the
rate of a dense bf16 matmul measured here (8192 cubed) and `--peak-tflops` (the
datasheet's dense figure; default by GPU name where known).
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
    p.add_argument("--head-dims", default="64,128,256")
    p.add_argument("--prefill", default="8192x1,8192x4",
                   help="prefill cases, TOKENSxCHUNKS ('' for none)")
    p.add_argument("--prefill-shape", default="32,8,64",
                   help="heads, KV heads, head dim of the prefill cases (default: llama-1b)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (TFLOP/s)")
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
    for head_dim in (int(x) for x in args.head_dims.split(",")):
        checked = 0
        for batch in (int(x) for x in args.batches.split(",")):
            for ctx in (int(x) for x in args.contexts.split(",")):
                kv_bytes = 2 * batch * ctx * args.kv_heads * head_dim * dtype.itemsize
                if kv_bytes > args.max_gib * 2**30:
                    continue
                check = checked < 2 and batch * ctx <= 64 * 4096
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
    if args.prefill:
        report["prefill"] = prefill_bench(args, dtype)
        if on_update:
            on_update(report)
    return report


PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16, SXM datasheets


def prefill_bench(args, dtype) -> dict:
    """The paged prefill kernel per `--prefill` case, against the gather + SDPA path."""
    import torch

    from llmesh.kernels import ops
    from llmesh.services.executor.attention import SeqSlice, TorchPagedAttention, build_metadata
    heads, kvh, head_dim = (int(x) for x in args.prefill_shape.split(","))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    matmul_s, _ = _time_calls(lambda: a @ a, 5)
    del a
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    out = {"heads": heads, "kv_heads": kvh, "head_dim": head_dim,
           "matmul_tflops": 2 * 8192 ** 3 / matmul_s / 1e12, "peak_tflops": peak, "rows": []}
    bs = args.block_size
    for case in args.prefill.split(","):
        tokens, chunks = (int(x) for x in case.split("x"))
        new = tokens // chunks
        cached = 0 if chunks == 1 else new
        per_seq = -(-(cached + new) // bs)
        perm = torch.randperm(chunks * per_seq).tolist()
        seqs = [SeqSlice(cached, new, perm[i * per_seq:(i + 1) * per_seq]) for i in range(chunks)]
        meta = build_metadata(seqs, bs, None, torch.device("cuda"), with_block_tables=True,
                          with_prefill_tables=True)
        k_cache = torch.randn(chunks * per_seq, bs, kvh, head_dim, dtype=dtype, device="cuda")
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(chunks * new, heads, head_dim, dtype=dtype, device="cuda")
        scale, b = head_dim ** -0.5, meta.prefill_bounds
        kernel_out = torch.empty_like(q)

        def kernel():
            ops.paged_prefill_attention(q, k_cache, v_cache, meta.prefill_block_tables, b[0], b[1],
                                        b[2], scale, max_q_len=meta.max_prefill_len,
                                        out=kernel_out)
        ref_out, backend = torch.empty_like(q), TorchPagedAttention()

        def gather_sdpa():
            backend.attend_prefills(q, k_cache, v_cache, meta, scale, ref_out)
        kernel_s, host_s = _time_calls(kernel, args.reps)
        sdpa_s, _ = _time_calls(gather_sdpa, args.reps)
        pairs = chunks * (new * cached + new * (new + 1) // 2)
        flops = 4 * heads * head_dim * pairs
        row = {"tokens": tokens, "chunks": chunks, "cached_per_chunk": cached,
               "kernel_s": kernel_s, "kernel_host_s": host_s, "gather_sdpa_s": sdpa_s,
               "kernel_tflops": flops / kernel_s / 1e12, "gather_sdpa_tflops": flops / sdpa_s / 1e12,
               "max_abs_err": float((kernel_out.float() - ref_out.float()).abs().max())}
        row["share_of_matmul"] = row["kernel_tflops"] / out["matmul_tflops"]
        row["share_of_peak"] = row["kernel_tflops"] / peak if peak else None
        out["rows"].append(row)
        kit.log(f"[bench kernels] prefill {tokens}x{chunks}: kernel {1e3 * kernel_s:.2f} ms "
                f"({row['kernel_tflops']:.0f} TFLOP/s), gather+SDPA {1e3 * sdpa_s:.2f} ms, "
                f"max abs err {row['max_abs_err']:.3g}")
        del k_cache, v_cache, q
        torch.cuda.empty_cache()
    return out


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
                      for r in report["rows"]], "r" * 8)]) + "\n" + _prefill_markdown(report)


def _prefill_markdown(report) -> str:
    p = report.get("prefill")
    if not p:
        return ""
    peak = f"{p['peak_tflops']:.0f}" if p["peak_tflops"] else "unknown"
    return "\n".join([
        "", f"### paged prefill: {p['heads']} heads / {p['kv_heads']} KV heads, head dim "
        f"{p['head_dim']}; dense bf16 matmul measured at {p['matmul_tflops']:.0f} TFLOP/s, "
        f"datasheet peak {peak}", "",
        kit.md_table(["tokens x chunks", "cached/chunk", "kernel", "TFLOP/s", "of matmul",
                      "of peak", "gather+SDPA", "max abs err"],
                     [[f"{r['tokens']}x{r['chunks']}", r["cached_per_chunk"],
                       f"{1e3 * r['kernel_s']:.2f} ms", f"{r['kernel_tflops']:.0f}",
                       f"{100 * r['share_of_matmul']:.0f}%",
                       f"{100 * r['share_of_peak']:.0f}%" if r["share_of_peak"] else "-",
                       f"{1e3 * r['gather_sdpa_s']:.2f} ms", f"{r['max_abs_err']:.3g}"]
                      for r in p["rows"]], "r" * 8)]) + "\n"


SPEC = kit.Spec("gpu_kernels", __doc__, options, run, model=None, table=markdown)

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
