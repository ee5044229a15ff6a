"""What tracing costs: throughput and CPU with tracing on (every request sampled,
exported to the local collector) against off, as interleaved pairs in one run.

Both meshes are up at once. While one serves a segment of `--requests` requests,
every process of the other is frozen (SIGSTOP), so it takes no CPU at all. Each
pair sends a fresh set of requests (a new seed, so no prefix-cache hits across
pairs) through both meshes, in alternating order. The headline is the median
over pairs of the on/off throughput ratio: the two segments of a pair run
seconds apart on the same machine, so the slow drift that makes separate runs of
one configuration differ by +-15% here cancels out of each ratio.

After each segment the mesh stays thawed for one export interval, so the spans
it made reach the collector; the CPU seconds of every process over segment plus
that wait give a second figure, CPU per output token, on against off.
"""
from __future__ import annotations

import contextlib
import json
import statistics

from llmesh.benchmarks import kit
from llmesh.benchmarks.tp import LIMITS, segment, vocab_size, workload

MODES = ("on", "off")


def spans(mesh: kit.BenchMesh) -> int:
    path = mesh.run_dir / "traces.jsonl"
    return sum(1 for _ in open(path)) if path.exists() else 0


def options(p) -> None:
    p.add_argument("--requests", type=int, default=16, help="requests per segment")
    p.add_argument("--pairs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--control", action="store_true",
                   help="an A/A run: tracing off in both meshes, to see the pair ratio's own spread")


def run(args) -> dict:
    from llmesh.observability.telemetry import EXPORT_INTERVAL_MS
    vocab = vocab_size(args.model)
    settle_s = EXPORT_INTERVAL_MS / 1e3 + 0.5
    traced = {"tracing": "off"} if args.control else {"tracing": "file", "sample_ratio": 1.0}
    pairs: list[dict] = []
    with contextlib.ExitStack() as stack:
        meshes = {}
        for mode in MODES:  # one up and warm at a time, the other frozen
            meshes[mode] = stack.enter_context(kit.BenchMesh(
                args.model, name=f"tracing-{mode}", engine=LIMITS,
                observability={**(traced if mode == "on" else {"tracing": "off"}),
                               "metrics": True}))
            segment(meshes[mode], workload(4, vocab, args.seed + 10_000), settle_s)
            meshes[mode].freeze()
        spans0 = spans(meshes["on"])
        for i in range(args.pairs):
            reqs = workload(args.requests, vocab, args.seed + i)
            pair = {}
            for mode in (MODES if i % 2 == 0 else MODES[::-1]):
                meshes[mode].thaw()
                pair[mode] = segment(meshes[mode], reqs, settle_s)
                meshes[mode].freeze()
            pair["ratio"] = pair["on"]["output_tokens_per_s"] / pair["off"]["output_tokens_per_s"]
            pair["cpu_ratio"] = (pair["on"]["cpu_ms_per_output_token"]
                                 / pair["off"]["cpu_ms_per_output_token"])
            kit.log(f"[tracing] pair {i + 1}/{args.pairs}: on/off {pair['ratio']:.3f}; "
                    f"CPU/token on/off {pair['cpu_ratio']:.3f}")
            pairs.append(pair)
        num_spans = spans(meshes["on"]) - spans0
    return {"pairs": pairs, "summary": summary(pairs, num_spans, args)}


def summary(pairs: list[dict], num_spans: int, args) -> dict:
    def med(f):
        return statistics.median(f(p) for p in pairs)

    ratios = sorted(p["ratio"] for p in pairs)
    names = sorted(set(pairs[0]["on"]["cpu_s"]) | set(pairs[0]["off"]["cpu_s"]))
    per_mode = {f"{k}_{mode}": med(lambda p: p[mode][key]) for mode in MODES for k, key in (
        ("tok_s", "output_tokens_per_s"), ("cpu_ms_per_token", "cpu_ms_per_output_token"),
        ("services_cpu_ms_per_token", "services_cpu_ms_per_output_token"))}
    return {
        "pairs": len(pairs), "requests_per_segment": args.requests, "control": args.control,
        "median_on_over_off": med(lambda p: p["ratio"]),
        "quartiles_on_over_off": [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]],
        "pairs_on_faster": sum(r > 1 for r in ratios),
        "median_cpu_on_over_off": med(lambda p: p["cpu_ratio"]), **per_mode,
        # where a step's time goes: the executor's forward, its round trip, the scheduler
        "per_step_ms": {k: {mode: med(lambda p: p[mode][k]) for mode in MODES}
                        for k in ("wall_ms_per_step", "forward_s_ms_per_step",
                                  "executor_rpc_s_ms_per_step", "schedule_s_ms_per_step")},
        "cpu_ms_per_token_by_process": {
            n: {mode: med(lambda p: 1e3 * p[mode]["cpu_s"].get(n, 0.0) / p[mode]["output_tokens"])
                for mode in MODES} for n in names},
        "spans_exported": num_spans,
        "spans_per_output_token": num_spans / sum(p["on"]["output_tokens"] for p in pairs),
    }


SPEC = kit.Spec("tracing_overhead", __doc__, options, run, model="bench",
                table=lambda report: json.dumps(report["summary"], indent=2))


def main(argv=None) -> int:
    return kit.main(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
