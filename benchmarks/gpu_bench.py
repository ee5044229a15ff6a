"""`llmesh bench gpu`: the engine on a GPU against the memory roofline (issue 14, Measure).

    llmesh bench gpu --shape llama-1b|llama-8b [--device cuda] [--dtype bfloat16] [--json OUT]

One invocation, on a random checkpoint of a real model's shape (gpu_shapes.py),
made on the device, nothing downloaded:

1. Decode steps at each batch size (`--batches`, default 1,64,256), driven straight
   through the engine's own ModelRunner (`engine.runner`, blocks from `engine.kv`)
   with decode-only StepPlans: the batch is prefilled, `--warmup-steps` run, then
   `--decode-steps` timed one by one (each `execute` ends with the sampled tokens'
   copy to the host; torch.cuda.synchronize around the loop); the median is the step.
   roofline = (weight bytes + KV bytes read) / peak memory bandwidth. Weight bytes
   are every parameter a decode step reads (an untied input embedding is left out:
   a step reads only its batch's rows of it); KV bytes are K and V of every token
   of every sequence's context, the step's own token included. share = roofline / step.
2. The profile split at `--profile-batch` (default 64): wall time per step against
   the GPU time the runner reports (StepResult.forward_s + sample_s, CUDA events
   spanning the step, idle gaps included), and the GPU's busy time per step from
   torch.profiler (the union of its kernels and copies), with the top kernels and
   host ops.
3. End to end, all requests at once (offline), greedy, ignore_eos, the same token
   ids to every target through benchmarks/harness.py: the engine (`--max-batched-
   tokens` per step, every request running at once), transformers `generate` on
   static batches (`--hf-batch-size`) and transformers' `generate_batch` machinery
   (continuous batching), both from hf_targets.py, loaded on the device. Output
   tok/s each, the ratios, and how many requests got the engine's exact tokens.

Everything is written to the JSON after each part, so a run cut short keeps what
it measured. The same code runs on the CPU (`--shape tiny-llama --device cpu
--dtype float32`): the tests run it so.

Here: the command line, the order of the parts, the goals and the table. Parts 1 and
2 are in gpu_decode.py, part 3 in gpu_e2e.py, the shapes and checkpoints in
gpu_shapes.py.
"""
from __future__ import annotations

import contextlib
import shlex
import sys
import tempfile
import time

from llmesh.benchmarks import gpu_shapes

GOALS = {  # issue 14: (shape, what, at least)
    "llama-8b": [("decode_share_b64", 0.70), ("decode_share_b1", 0.60)],
    "llama-1b": [("decode_share_b64", 0.40), ("engine_vs_hf_static", 10.0)],
}


def add_gpu_parser(bench) -> None:
    p = bench.add_parser("gpu", help="the engine on a GPU: end to end against transformers, "
                                     "decode steps against the memory roofline")
    p.add_argument("--shape", required=True, choices=sorted(gpu_shapes.SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--json", dest="json_out", help="write the report here")
    p.add_argument("--requests", type=int, help="end-to-end requests (default: the shape's)")
    p.add_argument("--prompt-tokens", type=int, help="prompt length (default: the shape's)")
    p.add_argument("--output-tokens", type=int, help="output length (default: the shape's)")
    p.add_argument("--targets", default="engine,hf-static,hf-cb",
                   help="end-to-end targets: engine, hf-static, hf-cb ('' for none)")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--max-batched-tokens", type=int, default=8192, help="engine token budget")
    p.add_argument("--batches", default="1,64,256", help="decode batch sizes ('' for none)")
    p.add_argument("--decode-steps", type=int, default=20, help="timed decode steps per batch")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--profile-batch", type=int,
                   help="batch of the profile split (default: 64 if measured, else the largest)")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--bandwidth-tbs", type=float,
                   help="peak memory bandwidth in TB/s (default: the GPU's spec sheet; on a "
                        "CPU, a measured copy)")
    p.add_argument("--checkpoint-dir", help="write the checkpoint here and keep it "
                                            "(default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def run_gpu_cli(args) -> int:
    import torch

    from llmesh.benchmarks.kit import write_json
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("bench gpu: no CUDA device here (use --device cpu --dtype float32 "
              "--shape tiny-llama to try it on a CPU)", file=sys.stderr)
        return 2
    report = run_gpu_bench(args, on_update=(lambda r: write_json(r, args.json_out))
                           if args.json_out else None)
    print(markdown(report), end="")
    if args.json_out:
        print(f"[bench gpu] wrote {args.json_out}", file=sys.stderr)
    return 1 if report["errors"] else 0


def _log(msg: str) -> None:
    print(f"[bench gpu] {msg}", file=sys.stderr, flush=True)


def run_gpu_bench(args, on_update=None) -> dict:
    from llmesh.benchmarks import gpu_decode, gpu_e2e, machine
    from llmesh.benchmarks.kit import stamp
    from llmesh.services.executor.model_config import load_model_config
    shape = gpu_shapes.SHAPES[args.shape]
    n_req = args.requests or shape.requests
    prompt = args.prompt_tokens or shape.prompt_tokens
    output = args.output_tokens or shape.output_tokens
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    report = {"kind": "llmesh-bench-gpu", "shape": gpu_shapes.shape_dict(shape),
              "device": args.device, "dtype": args.dtype,
              "workload": {"requests": n_req, "prompt_tokens": prompt, "output_tokens": output,
                           "greedy": True, "ignore_eos": True, "arrivals": "all at once",
                           "seed": args.seed},
              **stamp(shlex.join(["llmesh", *sys.argv[1:]])), "timings_s": {}, "errors": {}}

    def update() -> None:
        if on_update is not None:
            on_update(report)

    with contextlib.ExitStack() as stack:
        ckpt = args.checkpoint_dir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix=f"llmesh-{shape.name}-"))
        _log(f"making a random {shape.name} checkpoint ({args.dtype}) on {args.device} ...")
        report["checkpoint"] = gpu_shapes.make_checkpoint(shape, ckpt, args.device, args.dtype,
                                                          args.seed)
        report["timings_s"]["checkpoint"] = report["checkpoint"]["make_s"]
        mc = load_model_config(ckpt)
        model = {**machine.model_bytes(ckpt, args.dtype),
                 "kv_bytes_per_token": machine.kv_bytes_per_token(mc, args.dtype)}
        report["model"] = model
        report["bandwidth"] = gpu_decode.pick_bandwidth(args.device, args.bandwidth_tbs)
        update()
        requests = gpu_e2e.make_requests(n_req, prompt, output, shape.vocab_size, args.seed)
        tokens: dict[str, dict[int, list[int]]] = {}
        e2e: dict[str, dict] = {}
        report["end_to_end"] = {"targets": e2e}
        engine_config = gpu_e2e.engine_config(args, n_req, prompt, output, batches)
        report["engine_config"] = {k: getattr(engine_config, k) for k in (
            "device", "dtype", "block_size", "num_kv_blocks", "max_num_batched_tokens",
            "max_num_seqs", "pipeline_depth")}
        setup = gpu_e2e.bench_setup(ckpt, requests, targets, args)
        if batches or "engine" in targets:
            _engine_part(ckpt, engine_config, batches, prompt, targets, setup, tokens, args,
                         report, update)
        for name in (t for t in targets if t != "engine"):
            sink: dict[int, list[int]] = {}
            try:
                target = gpu_e2e.hf_target(name, ckpt, args, engine_config, output, sink)
            except ValueError as e:
                report["errors"][name] = str(e)
                continue
            gpu_e2e.run_target(name, target, setup, e2e, report)
            tokens[name] = sink
            del target
            gpu_e2e.free_memory(args.device)
            update()
        gpu_e2e.compare(report, tokens, n_req)
        report["goals"] = goals(report)
        update()
    return report


def _engine_part(ckpt, engine_config, batches, prompt, targets, setup, tokens, args, report,
                 update) -> None:
    """The engine: started once, the decode sweep through its runner, then its end-to-end run."""
    from llmesh.benchmarks import gpu_decode, gpu_e2e
    model, e2e = report["model"], report["end_to_end"]["targets"]
    shape = gpu_shapes.SHAPES[args.shape]
    t0 = time.perf_counter()
    _log("starting the engine ...")
    target = gpu_e2e.TokenEngineTarget(ckpt, engine_config)
    target.start()
    report["timings_s"]["engine_start"] = time.perf_counter() - t0
    try:
        if batches:
            t0 = time.perf_counter()
            try:
                runner = target.engine.runner
                # graphed decode (when the runner has graphs) and eager, side by side
                modes = [("graphs", contextlib.nullcontext)] if runner.graphs else []
                rows, profiles = [], {}
                for mode, context in modes + [("eager", runner.eager)]:
                    # (the engine's loop thread stays out of the runner)
                    with target.exclusive(), context():
                        mode_rows, profiles[mode] = gpu_decode.decode_sweep(
                            target.engine, batches, prompt, args, report["bandwidth"],
                            model["decode_bytes"], model["kv_bytes_per_token"],
                            shape.vocab_size)
                    rows += [{"mode": mode, **r} for r in mode_rows]
                    if profiles[mode]:
                        profiles[mode]["mode"] = mode
                profile = profiles[modes[0][0] if modes else "eager"]
                if runner.graphs:
                    report["cuda_graphs"] = {"sizes": runner.graphs.sizes,
                                             "capture_s": runner.graphs.capture_s}
                report["profile_eager"] = profiles["eager"] if modes else None
                report["decode"] = {"rows": rows, "weight_bytes": model["decode_bytes"],
                                    "all_weight_bytes": model["bytes"],
                                    "kv_bytes_per_token": model["kv_bytes_per_token"],
                                    "bandwidth_bytes_per_s":
                                        report["bandwidth"]["bytes_per_s"],
                                    "warmup_steps": args.warmup_steps,
                                    "decode_steps": args.decode_steps,
                                    "prompt_tokens": prompt}
                report["profile"] = profile
            except Exception as e:  # noqa: BLE001 - the other parts still run
                report["errors"]["decode"] = f"{type(e).__name__}: {e}"
                _log(f"decode sweep FAILED: {report['errors']['decode']}")
            report["timings_s"]["decode"] = time.perf_counter() - t0
            update()
        if "engine" in targets:
            gpu_e2e.run_target("engine", target, setup, e2e, report,
                               started_s=report["timings_s"]["engine_start"])
            tokens["engine"] = target.token_ids()
            update()
    finally:
        target.stop()
        target.engine.close()
        del target
        gpu_e2e.free_memory(args.device)


# ---- goals and the table ---------------------------------------------------
def goals(report) -> list:
    rows = report.get("decode", {}).get("rows", [])
    best = rows[0]["mode"] if rows else None  # graphs when the runner has them
    shares = {r["batch"]: r["share"] for r in rows if r["mode"] == best}
    measured = {"decode_share_b64": shares.get(64), "decode_share_b1": shares.get(1),
                "engine_vs_hf_static": report["end_to_end"]["ratios"].get("engine/hf-static")}
    return [{"goal": what, "at_least": floor, "measured": measured[what],
             "met": None if measured[what] is None else measured[what] >= floor}
            for what, floor in GOALS.get(report["shape"]["name"], [])]


def markdown(report) -> str:
    shape, bw = report["shape"], report.get("bandwidth", {})
    ck = report.get("checkpoint", {})
    lines = [f"## llmesh bench gpu: {shape['name']} ({shape['like']}), {report['dtype']} on "
             f"{report['machine'].get('gpu') or report['device']}", "",
             f"{ck.get('num_params', 0):,} parameters; "
             f"{report['workload']['requests']} requests x {report['workload']['prompt_tokens']}"
             f" prompt + {report['workload']['output_tokens']} output tokens, all at once, "
             "greedy, ignore_eos", ""]
    e2e = report.get("end_to_end", {})
    if e2e.get("targets"):
        lines += ["| target | output tok/s | engine / this | same tokens as engine |",
                  "|---|---:|---:|---:|"]
        for name, fig in e2e["targets"].items():
            ratio = e2e.get("ratios", {}).get(f"engine/{name}")
            agree = e2e.get("token_agreement", {}).get(name)
            ratio_s = "" if ratio is None else f"{ratio:.2f}x"
            agree_s = "" if not agree else f"{agree['identical']}/{agree['compared']}"
            lines.append(f"| {name}: {fig['label']} | {fig['output_tokens_per_s']:,.1f} | "
                         f"{ratio_s} | {agree_s} |")
        lines.append("")
    dec = report.get("decode")
    if dec:
        lines += [f"Decode step vs roofline = (weight + KV bytes) / {bw['bytes_per_s'] / 1e12:.3g}"
                  f" TB/s ({bw['source']}); measured copy rate "
                  f"{bw['measured_copy_bytes_per_s'] / 1e12:.3g} TB/s", "",
                  "| mode | batch | step | GPU (events) | roofline | share | tok/s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in dec["rows"]:
            lines.append(f"| {r['mode']} | {r['batch']} | {r['step_ms']:.3f} ms | "
                         f"{r['gpu_ms']:.3f} ms | "
                         f"{r['roofline_ms']:.3f} ms | {100 * r['share']:.1f}% | "
                         f"{r['tokens_per_s']:,.0f} |")
        lines.append("")
    for prof in (report.get("profile"), report.get("profile_eager")):
        if not prof:
            continue
        kernel = f", GPU busy {prof['kernel_ms']:.3f} ms ({100 * prof['kernel_over_wall']:.1f}%)" \
            if "kernel_ms" in prof else ""
        lines += [f"Profile ({prof.get('mode', '')}) at batch {prof['batch']}: wall {prof['wall_ms']:.3f} ms/step, GPU "
                  f"(events) {prof['gpu_event_ms']:.3f} ms ({100 * prof['gpu_event_over_wall']:.1f}"
                  f"%){kernel}", ""]
    for g in report.get("goals", []):
        m = g["measured"]
        lines.append(f"- goal {g['goal']} >= {g['at_least']:g}: "
                     f"{'not measured' if m is None else f'{m:.3g}'}"
                     f"{'' if g['met'] is None else (' (met)' if g['met'] else ' (NOT met)')}")
    for part, err in report.get("errors", {}).items():
        lines.append(f"- FAILED {part}: {err}")
    return "\n".join(lines) + "\n"
