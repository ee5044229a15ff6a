"""`llmesh bench gpu`, part 3: end to end against transformers.

All requests at once (offline), greedy, ignore_eos, the same token ids to every target
through benchmarks/harness.py: the engine (every request running at once), transformers
`generate` on static batches and transformers' `generate_batch` machinery (continuous
batching), both from hf_targets.py, loaded on the device. Output tok/s each, the ratios,
and how many requests got the engine's exact tokens: every target is given, when it is
made, what keeps each request's output token ids (hf_targets' `on_tokens`; for the
engine, TokenEngineTarget below).
"""
from __future__ import annotations

import asyncio
import collections
import gc
import random
import statistics
import sys
import time

from llmesh.benchmarks.targets import WARM_PROMPT, EngineTarget
from llmesh.services.engine.engine import Engine

TARGET_LABELS = {"engine": "llmesh Engine",
                 "hf-static": "transformers generate, static batches",
                 "hf-cb": "transformers generate_batch (continuous batching)"}


def _log(msg: str) -> None:
    print(f"[bench gpu] {msg}", file=sys.stderr, flush=True)


# ---- the workload and the targets ------------------------------------------
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

    if name == "hf-static":
        return hf_targets.HFStaticTarget(ckpt, args.hf_batch_size, dtype, device=args.device,
                                         on_tokens=keep)
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
        e2e[name] = {"label": TARGET_LABELS[name], "output_tokens_per_s":
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
