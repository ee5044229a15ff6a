"""The CPU runtime against llama.cpp's server: weight formats, served on both sides.

Every variant runs the same seeded `chat` workload (its first `--num-requests`
requests, greedy, ignore EOS) per round: all at once (offline output tokens per
second), then one at a time (single stream: median inter-token latency and
TTFT), then `--ttft-prompts` requests of exactly 512 prompt tokens and one
output token, one at a time (time to first token of a 512-token prompt).
Variants:

- `mesh-FORMAT[-tN][-eager]` (float32, bfloat16, float16-weights, int8, auto; N
  torch threads in the executor, default torch's; `-eager`: without the CPU
  decode kernel, `engine.cpu_decode_kernel: false`): the mesh, one replica,
  driven through its OpenAI HTTP API behind Envoy;
- `llama.cpp-OUTTYPE` (f32, bf16, f16, q8_0; `-npN` for N slots, default the
  mesh's running-sequence cap): llama.cpp's `llama-server`, built from the
  newest llama-cpp-python sdist and fed a GGUF its own converter made
  (`benchmarks/llama_cpp.py`); `llama.cpp-native` serves the model's own GGUF
  file when the model is one;
- an in-process engine format (`fp32`, `fp32-256MiB`, `int8`,
  `float16-weights`): the Engine in this process, an extra row, labelled so.

Served variants go through one client (the `openai` target: the same prompts as
token ids, the same concurrency, streamed), and every request's streamed and
server-reported token counts are checked against the requested ones. Rounds
reverse the order of the variants every other round; the report gives each
figure's median over rounds and its ratio to the first variant, and records
llama.cpp's commit, cmake flags, command lines and each GGUF's SHA-256.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from llmesh.benchmarks import kit
from llmesh.benchmarks.arrivals import ArrivalSpec
from llmesh.benchmarks.harness import BENCH_ENGINE_CONFIG, BenchSetup, RunSpec, context_limit, run_bench
from llmesh.benchmarks.workload import chat
from llmesh.services.executor.model_config import load_model_config

ENGINE_VARIANTS = {
    # the engine's KV before it was sized from memory: 256 MiB
    "fp32-256MiB": dict(dtype="float32", kv_cache_bytes=256 * 2**20),
    "fp32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16"),
    "int8": dict(dtype="int8"),
    "float16-weights": dict(dtype="float16-weights"),
}
MESH_FORMATS = ("float32", "bfloat16", "float16-weights", "int8", "auto")
FIGURES = ("offline_output_tokens_per_s", "single_itl_ms_p50", "single_ttft_ms_p50",
           "ttft_512_ms_p50")


def _check_counts(name: str, records: list, expected: int) -> None:
    """Every request OK, with as many tokens as requested: the server's own count (its
    usage), or the streamed count where a server reports none. (A client counting
    llama-server's SSE events misses tokens whose text is empty, e.g. half a
    UTF-8 character, so its usage is the count that holds.)"""
    bad = [(r.index, r.status, r.num_output_tokens, r.server_output_tokens, r.max_tokens)
           for r in records if r.status != "OK" or (
               r.server_output_tokens if r.server_output_tokens is not None
               else r.num_output_tokens) != r.max_tokens]
    if bad or len(records) != expected:
        raise RuntimeError(f"{name}: {len(records)}/{expected} requests; wrong ones "
                           f"(index, status, streamed, reported, requested): {bad[:5]}")


def ttft_512(url: str, model: str, vocab_size: int, num: int, seed: int) -> list[float]:
    """Time to the first streamed token of `num` 512-token prompts, one at a time (ms)."""
    import json
    import random
    import time
    import urllib.error
    import urllib.request
    rng = random.Random(seed)
    if not model:
        with urllib.request.urlopen(f"{url}/models", timeout=30) as r:
            model = json.load(r)["data"][0]["id"]
    out = []
    for _ in range(num):
        prompt = [rng.randrange(3, vocab_size) for _ in range(512)]
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0,
                           "stream": True, "ignore_eos": True}).encode()
        req = urllib.request.Request(f"{url}/completions", body,
                                     {"content-type": "application/json"})
        t0 = time.perf_counter()
        try:
            r = urllib.request.urlopen(req, timeout=600)
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{url}: HTTP {e.code}: {e.read()[:300]!r}") from None
        with r:
            for line in r:
                if line.startswith(b"data: {"):
                    out.append(1e3 * (time.perf_counter() - t0))
                    break
        # (the rest of the stream is read and dropped as the response closes)
    return out


def _served(name: str, model_dir: str, args, mc) -> tuple[str, str, callable, dict]:
    """Start the server a served variant names: (its /v1 URL, model name, stop, record)."""
    from llmesh.benchmarks import llama_cpp
    from llmesh.benchmarks.harness import mesh_config_for
    np_default = BENCH_ENGINE_CONFIG.max_num_seqs
    if name.startswith("mesh-"):
        spec, eager = _mesh_variant(name)
        fmt, _, threads = spec.partition("-t")
        cfg = mesh_config_for(dataclasses.replace(BENCH_ENGINE_CONFIG, dtype=fmt), mc)
        cfg = dataclasses.replace(cfg, executor_threads=int(threads or 0), engine=dataclasses.replace(
            cfg.engine, cpu_decode_kernel=not eager))
        mesh = kit.BenchMesh(model_dir, cfg).start()
        return (f"http://{mesh.endpoint}/v1", "", mesh.stop,
                {"server": "llmesh mesh (router HTTP API behind Envoy)", "dtype": fmt,
                 "max_num_seqs": cfg.engine.max_num_seqs,
                 "cpu_decode_kernel": cfg.engine.cpu_decode_kernel,
                 "executor_threads": cfg.executor_threads or "torch's default"})
    spec = name.removeprefix("llama.cpp-")
    outtype, _, np_part = spec.partition("-np")
    parallel = int(np_part) if np_part else np_default
    build = llama_cpp.build()
    if outtype == "native":
        # the GGUF file a rendered directory was made from (its config.json names it)
        gguf_path = json.loads((Path(model_dir) / "config.json").read_text()).get("gguf_file")
        if not gguf_path:
            raise SystemExit(f"llama.cpp-native: {model_dir} was not loaded from a GGUF file")
        gguf = {"path": gguf_path, "sha256": llama_cpp.sha256(gguf_path), "outtype": "native"}
    else:
        gguf = llama_cpp.convert(build, str(llama_cpp.hf_checkpoint(model_dir)), outtype)
    # each slot holds a whole request of the workload, and a 512-token prompt
    ctx = parallel * min(mc.max_position_embeddings, max(args.max_prompt + args.max_output, 528))
    from llmesh.mesh.ports import free_port
    port = free_port()
    proc, command = llama_cpp.serve(build, gguf["path"], port, parallel, args.threads, ctx)
    return (f"http://127.0.0.1:{port}/v1", "", lambda: llama_cpp.stop(proc),
            {"server": "llama.cpp llama-server", **build, "gguf": gguf,
             "command": " ".join(command)})


def _mesh_variant(name: str) -> tuple[str, bool]:
    """`mesh-FORMAT[-tN][-eager]` -> ("FORMAT[-tN]", whether the CPU decode kernel is off)."""
    spec = name.removeprefix("mesh-")
    return spec.removesuffix("-eager"), spec.endswith("-eager")


def _one(model_dir: str, name: str, peers: dict, args) -> dict:
    """The runs of one variant: the figures, and the engine's KV blocks."""
    mc = load_model_config(model_dir)
    engine_config = BENCH_ENGINE_CONFIG
    if name in ENGINE_VARIANTS:
        engine_config = dataclasses.replace(BENCH_ENGINE_CONFIG,
                                            **{"kv_cache_bytes": None, **ENGINE_VARIANTS[name]})
    url, stop, record = peers.get(name), (lambda: None), {}
    if name.startswith(("mesh-", "llama.cpp-")):
        url, _, stop, record = _served(name, model_dir, args, mc)
    try:
        limit = context_limit(mc, engine_config)
        setup = BenchSetup(
            model_dir=model_dir,
            workload=chat(mc.vocab_size, limit, args.seed, args.max_prompt, args.max_output,
                          mc.bos_token_id or 0),
            target_names=["openai" if url else "engine"],
            runs=[RunSpec(ArrivalSpec("offline"), num_requests=args.num_requests),
                  RunSpec(ArrivalSpec("concurrency", concurrency=1),
                          num_requests=args.single_requests)],
            engine_config=engine_config, openai_url=url, seed=args.seed,
            max_output=args.max_output, show_progress=False, log=lambda m: None)
        result = run_bench(setup)
        target = setup.target_names[0]
        for run_records, expected in zip(result.records[target],
                                         (args.num_requests, args.single_requests)):
            _check_counts(name, run_records, expected)
        ttfts = ttft_512(url, "", mc.vocab_size, args.ttft_prompts, args.seed) \
            if url and args.ttft_prompts else []
    finally:
        stop()
    report = result.report
    offline, single = (run["targets"][target] for run in report["runs"])
    # tokens/s from the tokens the server made (its usage; checked above to be the
    # requested ones): a client counting SSE events can miss some (_check_counts)
    seconds = offline["output_tokens"] / offline["output_tokens_per_s"]
    made = sum(r.server_output_tokens if r.server_output_tokens is not None
               else r.num_output_tokens for r in result.records[target][0])
    return {"offline_output_tokens_per_s": made / seconds,
            "offline_output_tokens": made, "offline_streamed_tokens": offline["output_tokens"],
            "offline_prompt_tokens": offline["prompt_tokens"],
            "offline_steps": offline.get("steps"),
            "kv_blocks": (offline.get("kv") or {}).get("num_blocks"),
            "kv_peak_usage": (offline.get("kv") or {}).get("peak_usage"),
            "single_itl_ms_p50": single["itl_ms"]["p50"],
            "single_ttft_ms_p50": single["ttft_ms"]["p50"],
            "ttft_512_ms_p50": sorted(ttfts)[len(ttfts) // 2] if ttfts else None,
            "ttft_512_ms": ttfts, "server": record}


def options(p) -> None:
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--single-requests", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default="mesh-float32,llama.cpp-f32,mesh-bfloat16,llama.cpp-bf16",
                   help="mesh-FORMAT[-tN][-eager] (" + ", ".join(MESH_FORMATS) + "), llama.cpp-OUTTYPE[-npN] "
                        "(f32, bf16, f16, q8_0, native), or an in-process engine format ("
                        + ", ".join(ENGINE_VARIANTS) + ")")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                   help="llama-server's -t and -tb (the mesh's executor uses torch's default)")
    p.add_argument("--ttft-prompts", type=int, default=5,
                   help="512-token prompts timed to their first token (served variants)")
    p.add_argument("--peer", action="append", default=[],
                   help="NAME=URL of an OpenAI-compatible server's /v1 (e.g. llama.cpp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--max-output", type=int, default=512)


def run(args) -> dict:
    peers = dict(item.split("=", 1) for item in args.peer)
    names = [v for v in args.variants.split(",") if v] + list(peers)
    unknown = [v for v in names if v not in ENGINE_VARIANTS and v not in peers
               and not (v.startswith("mesh-")
                        and _mesh_variant(v)[0].partition("-t")[0] in MESH_FORMATS)
               and not v.startswith("llama.cpp-")]
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
    servers = {n: rows[0].get("server") for n, rows in rounds.items()}
    for m in medians.values():
        m["offline_vs_first"] = m["offline_output_tokens_per_s"] / base["offline_output_tokens_per_s"]
        m["single_itl_vs_first"] = m["single_itl_ms_p50"] / base["single_itl_ms_p50"]
    return {"peers": peers, "servers": servers, "medians": medians, "rounds": rounds}


def table(report: dict) -> str:
    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"
    rows = [[name, num(m["offline_output_tokens_per_s"], ".0f"), num(m["offline_vs_first"], ".2f"),
             num(m["single_itl_ms_p50"], ".2f"), num(m["single_itl_vs_first"], ".2f"),
             num(m["single_ttft_ms_p50"], ".1f"), num(m["ttft_512_ms_p50"], ".1f")]
            for name, m in report["medians"].items()]
    return kit.md_table(["variant", "offline tok/s", "vs first", "single ms/token", "vs first",
                         "single TTFT ms", "TTFT 512 ms"], rows)


SPEC = kit.Spec("cpu_runtime", __doc__, options, run, model="bench", table=table)

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
