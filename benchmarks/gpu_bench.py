"""The engine on a GPU: end to end against transformers, decode steps against the
memory roofline (issue 14, Measure).

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
   tok/s each, the ratios, and how many requests got the engine's exact tokens:
   every target is given, when it is made, what keeps each request's output token
   ids (hf_targets' `on_tokens`; for the engine, TokenEngineTarget below).

Everything is written to the JSON after each part, so a run cut short keeps what
it measured. The same code runs on the CPU (`--shape tiny-llama --device cpu
--dtype float32`): the tests run it so.

Here: the command line, the order of the parts, part 3, the goals and the table.
Parts 1 and 2 are in gpu_decode.py, the shapes and checkpoints in gpu_shapes.py.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import random
import shlex
import statistics
import sys
import tempfile
import time

from llmesh.benchmarks import gpu_shapes, kit
from llmesh.benchmarks.targets import WARM_PROMPT, EngineTarget
from llmesh.services.engine.engine import Engine

GOALS = {  # issue 14: (shape, what, at least)
    "llama-8b": [("decode_share_b64", 0.70), ("decode_share_b1", 0.60)],
    "llama-1b": [("decode_share_b64", 0.40), ("engine_vs_hf_static", 10.0)],
}
TARGET_LABELS = {"engine": "llmesh Engine",
                 "hf-static": "transformers generate, static batches",
                 "hf-cb": "transformers generate_batch (continuous batching)"}


def options(p) -> None:
    p.add_argument("--shape", required=True, choices=sorted(gpu_shapes.SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--requests", type=int, help="end-to-end requests (default: the shape's)")
    p.add_argument("--prompt-tokens", type=int, help="prompt length (default: the shape's)")
    p.add_argument("--output-tokens", type=int, help="output length (default: the shape's)")
    p.add_argument("--targets", default="engine,hf-static,hf-cb",
                   help="end-to-end targets: engine, hf-static, hf-cb ('' for none)")
    p.add_argument("--hf-batch-size", default="64",
                   help="transformers' static batch size; several (64,128,256): one hf-static "
                        "run each, the engine compared with the fastest")
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


def _log(msg: str) -> None:
    kit.log(f"[bench gpu] {msg}")


def run(args) -> dict:
    """The report, also written to --json after each part (a run cut short keeps it)."""
    import torch
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench gpu: no CUDA device here (use --device cpu --dtype float32 "
                         "--shape tiny-llama to try it on a CPU)")
    return run_gpu_bench(args, on_update=(lambda r: kit.write_json(r, args.json))
                         if args.json else None)


def run_gpu_bench(args, on_update=None) -> dict:
    from llmesh.benchmarks import gpu_decode, machine
    from llmesh.services.executor.model_config import load_model_config
    shape = gpu_shapes.SHAPES[args.shape]
    n_req = args.requests or shape.requests
    prompt = args.prompt_tokens or shape.prompt_tokens
    output = args.output_tokens or shape.output_tokens
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    static_sizes = [int(b) for b in str(args.hf_batch_size).split(",")]
    if "hf-static" in targets and len(static_sizes) > 1:
        at = targets.index("hf-static")
        targets[at:at + 1] = [f"hf-static-{b}" for b in static_sizes]
    report = {"kind": "llmesh-bench-gpu", "shape": dataclasses.asdict(shape),
              "device": args.device, "dtype": args.dtype,
              "workload": {"requests": n_req, "prompt_tokens": prompt, "output_tokens": output,
                           "greedy": True, "ignore_eos": True, "arrivals": "all at once",
                           "seed": args.seed},
              **kit.stamp(shlex.join(["llmesh", *sys.argv[1:]])), "timings_s": {}, "errors": {}}

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
        requests = make_requests(n_req, prompt, output, shape.vocab_size, args.seed)
        tokens: dict[str, dict[int, list[int]]] = {}
        e2e: dict[str, dict] = {}
        report["end_to_end"] = {"targets": e2e}
        config = engine_config(args, n_req, prompt, output, batches)
        report["engine_config"] = {k: getattr(config, k) for k in (
            "device", "dtype", "block_size", "num_kv_blocks", "max_num_batched_tokens",
            "max_num_seqs", "pipeline_depth")}
        setup = bench_setup(ckpt, requests, targets, args)
        if batches or "engine" in targets:
            _engine_part(ckpt, config, batches, prompt, targets, setup, tokens, args,
                         report, update)
        for name in (t for t in targets if t != "engine"):
            sink: dict[int, list[int]] = {}
            try:
                target = hf_target(name, ckpt, args, config, output, sink)
            except ValueError as e:
                report["errors"][name] = str(e)
                continue
            run_target(name, target, setup, e2e, report)
            tokens[name] = sink
            del target
            free_memory(args.device)
            update()
        compare(report, tokens, n_req)
        report["goals"] = goals(report)
        update()
    return report


def _engine_part(ckpt, engine_config, batches, prompt, targets, setup, tokens, args, report,
                 update) -> None:
    """The engine: started once, the decode sweep through its runner, then its end-to-end run."""
    from llmesh.benchmarks import gpu_decode
    model, e2e = report["model"], report["end_to_end"]["targets"]
    shape = gpu_shapes.SHAPES[args.shape]
    t0 = time.perf_counter()
    _log("starting the engine ...")
    target = TokenEngineTarget(ckpt, engine_config)
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
            run_target("engine", target, setup, e2e, report,
                               started_s=report["timings_s"]["engine_start"])
            tokens["engine"] = target.token_ids()
            update()
    finally:
        target.stop()
        target.engine.close()
        del target
        free_memory(args.device)


# ---- part 3: the workload and the targets ----------------------------------
def make_requests(n: int, prompt_tokens: int, output_tokens: int, vocab_size: int,
                  seed: int) -> list:
    from llmesh.benchmarks.workload import FIRST_RANDOM_TOKEN, BenchRequest
    rng = random.Random(f"bench-gpu/{seed}")
    return [BenchRequest([rng.randrange(FIRST_RANDOM_TOKEN, vocab_size)
                          for _ in range(prompt_tokens)], output_tokens) for _ in range(n)]


def engine_config(args, n_req: int, prompt: int, output: int, batches: list[int]):
    """Every request running at once; KV blocks for them, or for the largest decode batch
    with its prompts, warm-up, timed and profiled steps, whichever is more."""
    from llmesh.services.engine.engine import EngineConfig
    bs = 16
    steps = args.warmup_steps + args.decode_steps + args.profile_steps + 1
    blocks = max(n_req * -(-(prompt + output) // bs),
                 max(batches, default=0) * -(-(prompt + steps) // bs))
    blocks += -(-(len(WARM_PROMPT) + 8) // bs) + 8
    return EngineConfig(device=args.device, dtype=args.dtype, block_size=bs,
                        num_kv_blocks=blocks, max_num_batched_tokens=args.max_batched_tokens,
                        max_num_seqs=max([n_req, *batches]))


def bench_setup(ckpt, requests, targets, args):
    from llmesh.benchmarks.arrivals import ArrivalSpec
    from llmesh.benchmarks.harness import BenchSetup, RunSpec
    from llmesh.benchmarks.workload import Workload
    wl = Workload("bench-gpu", {"name": "bench-gpu"}, lambda part: iter(requests))
    return BenchSetup(model_dir=str(ckpt), workload=wl, target_names=targets,
                      runs=[RunSpec(ArrivalSpec("offline"), num_requests=len(requests))],
                      seed=args.seed, show_progress=not args.no_progress, log=_log)


class _RecordingEngine(Engine):
    """An Engine that keeps every request's output token ids (`token_ids`, by request id)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_ids: dict[str, list[int]] = collections.defaultdict(list)

    def step(self):
        outputs = super().step()
        for out in outputs:
            self.token_ids[out.request_id].extend(out.new_token_ids)
        return outputs


class TokenEngineTarget(EngineTarget):
    """The harness's engine target on a _RecordingEngine: `token_ids()` gives each
    request's output token ids by its index; `exclusive()` keeps the target's thread
    out of the engine (the decode sweep drives its runner meanwhile)."""

    def __init__(self, model_dir, config):
        super().__init__(model_dir, config, engine_cls=_RecordingEngine)
        self._records: dict[str, object] = {}  # request id -> its RequestRecord

    def start(self) -> None:
        super().start()
        self.engine.token_ids.clear()  # (not the warm-up's)

    def _drain(self) -> None:
        if self._inbox:  # requests come in: note whose record each request id is
            super()._drain()
            self._records.update((rid, entry[0]) for rid, entry in self._live.items())

    def token_ids(self) -> dict[int, list[int]]:
        with self._lock:
            got = self.engine.token_ids
            return {rec.index: list(got[rid]) for rid, rec in self._records.items()
                    if rid in got}


def hf_target(name, ckpt, args, engine_config, output, sink: dict):
    """One of hf_targets.py's targets, not started: its model on `args.device`, each
    request's output token ids into `sink` by the request's index."""
    import torch

    from llmesh.benchmarks import hf_targets
    from llmesh.services.executor.weights import DTYPES
    dtype = DTYPES[args.dtype]

    def keep(rec, token_ids: list[int]) -> None:
        sink[rec.index] = token_ids

    if name.startswith("hf-static"):  # hf-static (the first size) or hf-static-<size>
        size = int(name.rsplit("-", 1)[1]) if name != "hf-static" \
            else int(str(args.hf_batch_size).split(",")[0])
        return hf_targets.HFStaticTarget(ckpt, size, dtype, device=args.device, on_tokens=keep)
    if name == "hf-cb":
        cuda = torch.device(args.device).type == "cuda"
        # on a GPU transformers sizes its cache from the free memory (its paged attention
        # does not build the CPU path's dense mask); on a CPU, the engine's capacity
        kv = None if cuda else engine_config.num_kv_blocks * engine_config.block_size
        return hf_targets.HFCBTarget(ckpt, output, dtype, kv_tokens=kv,
                                     max_batch_tokens=engine_config.max_num_batched_tokens,
                                     max_requests_per_batch=engine_config.max_num_seqs,
                                     device=args.device, on_tokens=keep)
    raise ValueError(f"unknown target {name!r}: engine, hf-static or hf-cb")


# ---- one run, and the comparison -------------------------------------------
def run_target(name, target, setup, e2e, report, started_s: float | None = None) -> None:
    """One offline run of `target` into `e2e[name]`: it was started already, in
    `started_s`, or (None) it is started here and stopped after."""
    from llmesh.benchmarks.harness import _session
    from llmesh.benchmarks.metrics import summarize
    owned = started_s is None
    t0 = time.perf_counter()
    try:
        if owned:
            _log(f"{name}: starting ...")
            target.start()
            started_s = time.perf_counter() - t0
        offsets = [[0.0] * setup.runs[0].num_requests]
        [(recs, run_t0, stats)] = asyncio.run(_session(target, name, setup, offsets))
        fig = summarize(recs, run_t0, {})
        stats = {k: v for k, v in stats.items() if k not in ("kv", "batches")}
        label = TARGET_LABELS.get(name) or f"{TARGET_LABELS['hf-static']} of {name.rsplit('-', 1)[1]}"
        e2e[name] = {"label": label, "output_tokens_per_s":
                     fig["output_tokens_per_s"], "duration_s": fig["duration_s"],
                     "num_requests": fig["num_requests"], "num_ok": fig["num_ok"],
                     "output_tokens": fig["output_tokens"],
                     "ttft_ms_p50": fig["ttft_ms"].get("p50"),
                     "ttft_ms_p99": fig["ttft_ms"].get("p99"),
                     "tpot_ms_p50": fig["tpot_ms"].get("p50"), "startup_s": started_s,
                     "stats": stats}
        _log(f"{name}: {fig['num_ok']}/{fig['num_requests']} ok, "
             f"{fig['output_tokens_per_s']:.1f} output tok/s")
    except Exception as e:  # noqa: BLE001 - one target failing must not lose the others
        report["errors"][name] = f"{type(e).__name__}: {e}"
        _log(f"{name}: FAILED: {report['errors'][name]}")
    finally:
        if owned:
            target.stop()  # (hf_targets' stop lets go of the model)
        report["timings_s"][f"e2e_{name}"] = time.perf_counter() - t0


def free_memory(device) -> None:
    import torch
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def compare(report, tokens, n_req) -> None:
    """The engine's output tok/s over each other target's, and their tokens' agreement."""
    e2e = report["end_to_end"]["targets"]
    ratios, agreement = {}, {}
    base = e2e.get("engine")
    for name, fig in e2e.items():
        if name != "engine" and base and fig["output_tokens_per_s"]:
            ratios[f"engine/{name}"] = base["output_tokens_per_s"] / fig["output_tokens_per_s"]
        if name != "engine" and "engine" in tokens and name in tokens:
            agreement[name] = token_agreement(tokens["engine"], tokens[name], n_req)
    statics = {n: f for n, f in e2e.items() if n.startswith("hf-static-") and f["output_tokens_per_s"]}
    if base and statics:  # several static batch sizes: the engine against the fastest
        best = max(statics, key=lambda n: statics[n]["output_tokens_per_s"])
        ratios["engine/hf-static"] = ratios[f"engine/{best}"]
        report["end_to_end"]["hf_static_best"] = best
    report["end_to_end"]["ratios"] = ratios
    report["end_to_end"]["token_agreement"] = agreement


def token_agreement(ref: dict, other: dict, n: int) -> dict:
    """Requests whose tokens equal the engine's, and how far they agree on average."""
    both = [i for i in range(n) if i in ref and i in other]
    same = sum(ref[i] == other[i] for i in both)
    prefix = []
    for i in both:
        k = next((j for j, (a, b) in enumerate(zip(ref[i], other[i])) if a != b),
                 min(len(ref[i]), len(other[i])))
        prefix.append(k / max(len(ref[i]), 1))
    return {"compared": len(both), "identical": same,
            "identical_fraction": same / len(both) if both else None,
            "mean_common_prefix_fraction": statistics.fmean(prefix) if prefix else None}


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
        rows = []
        for name, fig in e2e["targets"].items():
            ratio = e2e.get("ratios", {}).get(f"engine/{name}")
            agree = e2e.get("token_agreement", {}).get(name)
            rows.append([f"{name}: {fig['label']}", f"{fig['output_tokens_per_s']:,.1f}",
                         "" if ratio is None else f"{ratio:.2f}x",
                         "" if not agree else f"{agree['identical']}/{agree['compared']}"])
        lines += [kit.md_table(["target", "output tok/s", "engine / this",
                                "same tokens as engine"], rows), ""]
    dec = report.get("decode")
    if dec:
        lines += [f"Decode step vs roofline = (weight + KV bytes) / {bw['bytes_per_s'] / 1e12:.3g}"
                  f" TB/s ({bw['source']}); measured copy rate "
                  f"{bw['measured_copy_bytes_per_s'] / 1e12:.3g} TB/s", "",
                  kit.md_table(["mode", "batch", "step", "GPU (events)", "roofline", "share",
                                "tok/s"],
                               [[r["mode"], r["batch"], f"{r['step_ms']:.3f} ms",
                                 f"{r['gpu_ms']:.3f} ms", f"{r['roofline_ms']:.3f} ms",
                                 f"{100 * r['share']:.1f}%", f"{r['tokens_per_s']:,.0f}"]
                                for r in dec["rows"]]), ""]
    for prof in (report.get("profile"), report.get("profile_eager")):
        if not prof:
            continue
        kernel = f", GPU busy {prof['kernel_ms']:.3f} ms ({100 * prof['kernel_over_wall']:.1f}%)" \
            if "kernel_ms" in prof else ""
        lines += [f"Profile ({prof.get('mode', '')}) at batch {prof['batch']}: wall "
                  f"{prof['wall_ms']:.3f} ms/step, GPU (events) {prof['gpu_event_ms']:.3f} ms "
                  f"({100 * prof['gpu_event_over_wall']:.1f}%){kernel}", ""]
    for g in report.get("goals", []):
        m = g["measured"]
        lines.append(f"- goal {g['goal']} >= {g['at_least']:g}: "
                     f"{'not measured' if m is None else f'{m:.3g}'}"
                     f"{'' if g['met'] is None else (' (met)' if g['met'] else ' (NOT met)')}")
    for part, err in report.get("errors", {}).items():
        lines.append(f"- FAILED {part}: {err}")
    return "\n".join(lines) + "\n"


SPEC = kit.Spec("gpu_bench", __doc__, options, run, model=None,
                passed=lambda report: not report["errors"], table=markdown)

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
