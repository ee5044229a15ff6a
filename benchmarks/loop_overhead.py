"""What the in-process engine's loop costs per step at a large batch.

    python -m llmesh.benchmarks.loop_overhead [--batch 256] [--step-ms 5] [--rounds 3] [--json OUT]

The Engine runs the benchmark-only SleepModel (its forward sleeps `step_ms`
and uses no CPU, like a GPU step of that length) over `batch` requests of
`--prompt` prompt and `--output` output tokens, all at once. A decode step then
costs step_ms plus whatever the host adds: the scheduler's plan and update,
the runner's inputs and sampling, and, with pipelined steps (depth 2), the time
the runner thread waits for the GIL the loop thread holds. Each configuration
(pipeline depth, the interpreter's GIL switch interval) runs in turn, the order
alternating per round; the medians over rounds are reported as ms per step
(wall / steps) and as a multiple of step_ms.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

CONFIGS = [(1, 0.005), (2, 0.005), (1, 0.001), (2, 0.001)]  # (pipeline depth, switch interval s)


def run_once(model_dir: str, batch: int, step_ms: float, depth: int, switch_s: float,
             prompt: int, output: int) -> dict:
    from llmesh.services.common.sampling_params import SamplingParams
    from llmesh.services.engine.engine import Engine, EngineConfig
    from llmesh.services.executor.sleep_model import SleepModel
    from llmesh.services.executor.weights import load_model
    model = SleepModel(load_model(model_dir).config, step_ms / 1000)
    blocks = batch * (-(-(prompt + output) // 16) + 1)
    engine = Engine(model, EngineConfig(num_kv_blocks=blocks, max_num_seqs=batch,
                                        max_num_batched_tokens=max(8192, prompt),
                                        pipeline_depth=depth))
    rng = random.Random(0)
    prompts = [[1] + rng.choices(range(3, 3000), k=prompt - 1) for _ in range(batch)]
    before = sys.getswitchinterval()
    sys.setswitchinterval(switch_s)
    try:
        t0 = time.perf_counter()
        engine.generate(prompts, SamplingParams(max_tokens=output, ignore_eos=True))
        wall = time.perf_counter() - t0
    finally:
        sys.setswitchinterval(before)
        engine.close()
    s = engine.stats
    return {"depth": depth, "switch_ms": 1e3 * switch_s, "steps": s.num_steps,
            "ms_per_step": 1e3 * wall / s.num_steps, "over_step": wall / s.num_steps / (step_ms / 1e3),
            "schedule_ms": 1e3 * s.schedule_s / s.num_steps,
            "forward_ms": 1e3 * s.forward_s / s.num_steps,
            "sample_ms": 1e3 * s.sample_s / s.num_steps, "tokens_per_s": batch * output / wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llmesh.benchmarks.loop_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the tiny preset; only its "
                                   "config is used)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--step-ms", type=float, default=5.0)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    from llmesh.mesh.default_model import default_model_dir
    model_dir = args.model or str(default_model_dir())
    runs: dict[tuple, list[dict]] = {c: [] for c in CONFIGS}
    for r in range(args.rounds):
        for depth, switch_s in (CONFIGS if r % 2 == 0 else CONFIGS[::-1]):
            out = run_once(model_dir, args.batch, args.step_ms, depth, switch_s, args.prompt,
                           args.output)
            runs[(depth, switch_s)].append(out)
            print(f"[loop overhead] round {r} depth {depth} switch {1e3 * switch_s:g} ms: "
                  f"{out['ms_per_step']:.2f} ms/step", file=sys.stderr, flush=True)
    rows = []
    for (depth, switch_s), outs in runs.items():
        row = {k: statistics.median(o[k] for o in outs) for k in outs[0]}
        rows.append(row)
    report = {"batch": args.batch, "step_ms": args.step_ms, "prompt": args.prompt,
              "output": args.output, "rounds": args.rounds, "rows": rows}
    print("| depth | GIL switch | ms/step | x step | schedule | forward | sample | tok/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['depth']:.0f} | {r['switch_ms']:g} ms | {r['ms_per_step']:.2f} | "
              f"{r['over_step']:.2f} | {r['schedule_ms']:.2f} | {r['forward_ms']:.2f} | "
              f"{r['sample_ms']:.2f} | {r['tokens_per_s']:,.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
