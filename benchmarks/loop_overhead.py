"""What the in-process engine's loop costs per step at a large batch.

The Engine runs the benchmark-only SleepModel (its forward sleeps `--step-ms`
and uses no CPU, like a GPU step of that length) over `--batch` requests of
`--prompt` prompt and `--output` output tokens, all at once. A decode step then
costs step_ms plus whatever the host adds: the scheduler's plan and update,
the runner's inputs and sampling, and, with pipelined steps (depth 2), the time
the runner thread waits for the GIL the loop thread holds. Each configuration
(pipeline depth, the interpreter's GIL switch interval) runs in turn, the order
alternating per round; the medians over rounds are reported as ms per step
(wall / steps) and as a multiple of step_ms.
"""
from __future__ import annotations

import random
import sys
import time

from llmesh.benchmarks import kit

CONFIGS = [(1, 0.005), (2, 0.005), (1, 0.001), (2, 0.001)]  # (pipeline depth, switch interval s)


def sleep_engine(model_dir: str, step_ms: float, tokenizer: bool = False, **config):
    """The in-process Engine over the SleepModel, with `config` (EngineConfig fields)."""
    from llmesh.services.common.tokenizer import TextTokenizer
    from llmesh.services.engine.engine import Engine, EngineConfig
    from llmesh.services.executor.model_config import load_model_config
    from llmesh.services.executor.sleep_model import SleepModel
    return Engine(SleepModel(load_model_config(model_dir), step_ms / 1e3), EngineConfig(**config),
                  TextTokenizer(model_dir) if tokenizer else None)


def timed(engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    """Generate (ignore_eos): the wall seconds and the steps it took."""
    from llmesh.services.common.sampling_params import SamplingParams
    steps0, t0 = engine.stats.num_steps, time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return time.perf_counter() - t0, engine.stats.num_steps - steps0


def run_once(args, depth: int, switch_s: float) -> dict:
    blocks = args.batch * (-(-(args.prompt + args.output) // 16) + 1)
    engine = sleep_engine(args.model, args.step_ms, num_kv_blocks=blocks,
                          max_num_seqs=args.batch, pipeline_depth=depth,
                          max_num_batched_tokens=max(8192, args.prompt))
    rng = random.Random(0)
    prompts = [[1] + rng.choices(range(3, 3000), k=args.prompt - 1) for _ in range(args.batch)]
    before = sys.getswitchinterval()
    sys.setswitchinterval(switch_s)
    try:
        wall, steps = timed(engine, prompts, args.output)
    finally:
        sys.setswitchinterval(before)
        engine.close()
    s = engine.stats
    out = {"depth": depth, "switch_ms": 1e3 * switch_s, "steps": steps,
           "ms_per_step": 1e3 * wall / steps, "over_step": wall / steps / (args.step_ms / 1e3),
           "schedule_ms": 1e3 * s.schedule_s / steps, "forward_ms": 1e3 * s.forward_s / steps,
           "sample_ms": 1e3 * s.sample_s / steps, "tokens_per_s": args.batch * args.output / wall}
    kit.log(f"[loop overhead] depth {depth} switch {1e3 * switch_s:g} ms: "
            f"{out['ms_per_step']:.2f} ms/step")
    return out


def options(p) -> None:
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--step-ms", type=float, default=5.0)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)


def run(args) -> dict:
    runs = kit.alternate(args.rounds, CONFIGS, lambda c: run_once(args, *c))
    return {"rows": [kit.medians(outs) for outs in runs.values()]}


def table(report: dict) -> str:
    return kit.md_table(
        ["depth", "GIL switch", "ms/step", "x step", "schedule", "forward", "sample", "tok/s"],
        [[f"{r['depth']:.0f}", f"{r['switch_ms']:g} ms", f"{r['ms_per_step']:.2f}",
          f"{r['over_step']:.2f}", f"{r['schedule_ms']:.2f}", f"{r['forward_ms']:.2f}",
          f"{r['sample_ms']:.2f}", f"{r['tokens_per_s']:,.0f}"] for r in report["rows"]],
        "r" * 8)


SPEC = kit.Spec("loop_overhead", __doc__, options, run, table=table)

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
