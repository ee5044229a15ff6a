"""The CPU runtime against its peers: weight formats, KV sizing, and llama.cpp.

Every variant runs the same seeded `chat` workload (its first `--num-requests`
requests, greedy, ignore EOS) twice per round: all at once (offline output
tokens per second), then one at a time (single stream: median inter-token
latency and TTFT). Engine variants are the in-process Engine with a weight
format and a KV setting; a peer is any OpenAI-compatible server already running
(llama.cpp's `llama-server`, say), driven through the `openai` target with the
same prompts as token ids. Rounds reverse the order of the variants every other
round, so no one always runs first or last; the report gives each figure's median over rounds
and its ratio to the first variant.
"""
from __future__ import annotations

import dataclasses

from llmesh.benchmarks import kit
from llmesh.benchmarks.arrivals import ArrivalSpec
from llmesh.benchmarks.harness import BENCH_ENGINE_CONFIG, BenchSetup, RunSpec, context_limit, run_bench
from llmesh.benchmarks.workload import chat
from llmesh.services.executor.model_config import load_model_config

ENGINE_VARIANTS = {
    # the engine's KV before it was sized from memory: 256 MiB
    "fp32-256MiB": dict(dtype="float32", kv_cache_bytes=256 * 2**20),
    "fp32": dict(dtype="float32"),
    "int8": dict(dtype="int8"),
    "float16-weights": dict(dtype="float16-weights"),
}
FIGURES = ("offline_output_tokens_per_s", "single_itl_ms_p50", "single_ttft_ms_p50")


def _one(model_dir: str, name: str, peers: dict, args) -> dict:
    """Both runs of one variant: the figures, and the engine's KV blocks."""
    mc = load_model_config(model_dir)
    engine_config = BENCH_ENGINE_CONFIG
    if name in ENGINE_VARIANTS:
        engine_config = dataclasses.replace(BENCH_ENGINE_CONFIG,
                                            **{"kv_cache_bytes": None, **ENGINE_VARIANTS[name]})
    limit = context_limit(mc, engine_config)
    setup = BenchSetup(
        model_dir=model_dir,
        workload=chat(mc.vocab_size, limit, args.seed, args.max_prompt, args.max_output,
                      mc.bos_token_id or 0),
        target_names=["openai" if name in peers else "engine"],
        runs=[RunSpec(ArrivalSpec("offline"), num_requests=args.num_requests),
              RunSpec(ArrivalSpec("concurrency", concurrency=1),
                      num_requests=args.single_requests)],
        engine_config=engine_config, openai_url=peers.get(name), seed=args.seed,
        max_output=args.max_output, show_progress=False, log=lambda m: None)
    report = run_bench(setup).report
    offline, single = (run["targets"][setup.target_names[0]] for run in report["runs"])
    if offline["num_ok"] != args.num_requests or single["num_ok"] != args.single_requests:
        raise RuntimeError(f"{name}: requests failed: {offline['status_counts']} "
                           f"{single['status_counts']}")
    return {"offline_output_tokens_per_s": offline["output_tokens_per_s"],
            "offline_output_tokens": offline["output_tokens"],
            "offline_prompt_tokens": offline["prompt_tokens"],
            "offline_steps": offline.get("steps"),
            "kv_blocks": (offline.get("kv") or {}).get("num_blocks"),
            "kv_peak_usage": (offline.get("kv") or {}).get("peak_usage"),
            "single_itl_ms_p50": single["itl_ms"]["p50"],
            "single_ttft_ms_p50": single["ttft_ms"]["p50"]}


def options(p) -> None:
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--single-requests", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default=",".join(ENGINE_VARIANTS),
                   help=f"engine variants: {', '.join(ENGINE_VARIANTS)}")
    p.add_argument("--peer", action="append", default=[],
                   help="NAME=URL of an OpenAI-compatible server's /v1 (e.g. llama.cpp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--max-output", type=int, default=512)


def run(args) -> dict:
    peers = dict(item.split("=", 1) for item in args.peer)
    names = [v for v in args.variants.split(",") if v] + list(peers)
    unknown = [v for v in names if v not in ENGINE_VARIANTS and v not in peers]
    if unknown:
        raise ValueError(f"unknown variants {unknown}")

    def once(name: str) -> dict:
        kit.log(f"[cpu_runtime] {name} ...")
        out = _one(args.model, name, peers, args)
        kit.log(f"[cpu_runtime]   {out}")
        return out
    rounds = kit.alternate(args.rounds, names, once)
    medians = {n: kit.medians(rows, FIGURES) for n, rows in rounds.items()}
    base = medians[names[0]]
    for m in medians.values():
        m["offline_vs_first"] = m["offline_output_tokens_per_s"] / base["offline_output_tokens_per_s"]
        m["single_itl_vs_first"] = m["single_itl_ms_p50"] / base["single_itl_ms_p50"]
    return {"peers": peers, "medians": medians, "rounds": rounds}


SPEC = kit.Spec("cpu_runtime", __doc__, options, run, model="bench")

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
