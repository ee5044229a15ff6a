"""Tensor-parallel overhead: the same workload through a TP=1 mesh and a TP=2 mesh,
alternating, in one run.

On a CPU machine the two ranks share the cores the single rank had (each rank
gets cores / ranks torch threads), so the ratio is an overhead figure: what the
all-reduces, the logits gather and the token broadcast cost, not a speedup.
Reports output tokens/s, per-step forward and collective time (rank 0's view:
its wait for the other rank included), and each rank's resident memory.
"""
from __future__ import annotations

import asyncio
import random
import time

from llmesh.benchmarks import kit

LIMITS = {"num_kv_blocks": 4096, "max_num_batched_tokens": 1024, "max_num_seqs": 64}


def workload(num_requests: int, vocab_size: int, seed: int) -> list:
    """GenerateRequests, greedy: prompts of 16..512 tokens and outputs of 16..256,
    long-tailed, seeded."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        n_prompt = int(min(512, max(16, rng.lognormvariate(0, 0.8) * 128)))
        n_out = int(min(256, max(16, rng.lognormvariate(0, 0.8) * 64)))
        out.append(kit.request([1] + [rng.randrange(8, vocab_size) for _ in range(n_prompt - 1)],
                               n_out, temperature=0.0))
    return out


def play(mesh: kit.BenchMesh, reqs: list) -> tuple[float, int]:
    """All of `reqs` at once: (wall seconds, output tokens)."""
    answers = asyncio.run(kit.load(mesh.endpoint, reqs.__getitem__, count=len(reqs),
                                   timeout_s=1800))
    return kit.wall_s(answers), kit.num_tokens(answers)


def segment(mesh: kit.BenchMesh, reqs: list, settle_s: float = 0.0) -> dict:
    """`reqs` through the mesh: throughput, the scheduler's per-step split, and the
    CPU seconds each process used (read `settle_s` after the last answer)."""
    cpu0, s0 = mesh.cpu_s(), mesh.stats()
    wall, tokens = play(mesh, reqs)
    s1 = mesh.stats()
    time.sleep(settle_s)
    cpu = {n: v - cpu0.get(n, 0.0) for n, v in mesh.cpu_s().items()}
    services = sum(v for n, v in cpu.items() if not n.startswith("executor"))
    steps = max(1, s1.num_steps - s0.num_steps)
    return {"wall_s": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
            "steps": steps, "wall_ms_per_step": 1e3 * wall / steps,
            **{f"{k}_ms_per_step": 1e3 * (getattr(s1, k) - getattr(s0, k)) / steps
               for k in ("forward_s", "comm_s", "executor_rpc_s", "schedule_s")},
            "cpu_s": cpu, "cpu_ms_per_output_token": 1e3 * sum(cpu.values()) / tokens,
            "services_cpu_ms_per_output_token": 1e3 * services / tokens}


def options(p) -> None:
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)


def vocab_size(model_dir: str) -> int:
    from llmesh.services.executor.model_config import load_model_config
    return load_model_config(model_dir).vocab_size


def run(args) -> dict:
    vocab = vocab_size(args.model)
    reqs, warm = workload(args.requests, vocab, args.seed), workload(4, vocab, args.seed + 1)

    def once(tp: int) -> dict:
        with kit.BenchMesh(args.model, name=f"tp{tp}", tensor_parallel=tp, engine=LIMITS,
                           observability={"tracing": "file", "metrics": True}) as mesh:
            play(mesh, warm)
            res = {"tensor_parallel": tp, **segment(mesh, reqs),
                   "rank_rss_mib": [mesh.rss_mib()[f"executor-0-{r}"] for r in range(tp)]}
        kit.log(f"[tp] TP={tp}: {res['output_tokens_per_s']:.1f} tok/s, forward "
                f"{res['forward_s_ms_per_step']:.2f} ms/step of which collectives "
                f"{res['comm_s_ms_per_step']:.2f} ms, rank RSS {res['rank_rss_mib']} MiB")
        return res
    runs = kit.alternate(args.rounds, [1, 2], once)
    summary = {f"tp{tp}": {**kit.medians(rs, ("output_tokens_per_s", "forward_s_ms_per_step",
                                              "comm_s_ms_per_step",
                                              "executor_rpc_s_ms_per_step")),
                           "rank_rss_mib": [kit.medians([{"m": r["rank_rss_mib"][i]} for r in rs])
                                            ["m"] for i in range(tp)]}
               for tp, rs in runs.items()}
    summary["tp2_over_tp1_throughput"] = (summary["tp2"]["output_tokens_per_s"]
                                          / summary["tp1"]["output_tokens_per_s"])
    return {"limits": LIMITS, "runs": runs, "summary": summary}


SPEC = kit.Spec("tp", __doc__, options, run, model="bench")

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
