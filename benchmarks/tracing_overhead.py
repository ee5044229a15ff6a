"""What tracing costs: throughput and CPU with tracing on (every request sampled,
exported to the local collector) against off, as interleaved pairs in one run.

    python -m llmesh.benchmarks.tracing_overhead [--model DIR] [--requests 16] [--pairs 12] [--json OUT]

Both meshes are up at once. While one serves a segment of requests, every
process of the other is frozen (SIGSTOP), so it takes no CPU at all. Each pair
sends a fresh set of requests (a new seed, so no prefix-cache hits across
pairs) through both meshes, in alternating order. The headline is the median
over pairs of the on/off throughput ratio: the two segments of a pair run
seconds apart on the same machine, so the slow drift that makes separate runs of
one configuration differ by +-15% here cancels out of each ratio.

After each segment the mesh stays thawed for one export interval, so the spans
it made reach the collector; the CPU seconds of every process over segment plus
that wait give a second figure, CPU per output token, on against off.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from llmesh.benchmarks.tp import _cpu_s, _drive, _stats, log, workload
from llmesh.mesh.config import EngineLimits, EnvoyConfig, MeshConfig, ObservabilityConfig, resolve_ports
from llmesh.mesh.supervisor import Supervisor, build_specs, envoy_ready
from llmesh.observability.telemetry import EXPORT_INTERVAL_MS
from llmesh.services.executor.model_config import load_model_config


class _Mesh:
    """One mesh of the pair, which can be frozen and thawed as a whole."""

    def __init__(self, name: str, model_dir: str, limits: EngineLimits,
                 observability: ObservabilityConfig):
        self.name = name
        self.cfg = resolve_ports(MeshConfig(engine=limits, envoy=EnvoyConfig(port=0, admin_port=0),
                                            observability=observability))
        self._dir = tempfile.TemporaryDirectory(prefix=f"llmesh-tracing-{name}-")
        self.run_dir = Path(self._dir.name)
        self.sup = Supervisor(build_specs(self.cfg, model_dir, self.run_dir), self.run_dir)
        self.endpoint = f"127.0.0.1:{self.cfg.envoy.port}"

    def start(self) -> None:
        self.sup.start(timeout_s=300)

    def pids(self) -> dict[str, int]:
        return self.sup.pids()

    def freeze(self) -> None:
        for pid in self.pids().values():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self.pids().values():
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 30  # Envoy's health checks may need a round to agree
        while not envoy_ready(self.cfg.envoy.admin_port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"mesh {self.name}: Envoy sees no healthy router after thaw")
            time.sleep(0.1)

    def segment(self, reqs, settle_s: float) -> dict:
        """Serve `reqs`; then wait `settle_s` (spans exported) and read CPU seconds."""
        pids = self.pids()
        sched = self.cfg.replica_ports[0].scheduler
        cpu0 = {n: _cpu_s(p) for n, p in pids.items()}
        st0 = _stats(sched)
        wall, tokens = asyncio.run(_drive(self.endpoint, reqs))
        st1 = _stats(sched)
        time.sleep(settle_s)
        cpu = {n: _cpu_s(p) - cpu0[n] for n, p in pids.items()}
        steps = max(1, st1.num_steps - st0.num_steps)
        per_step = {f"{k}_ms_per_step": 1e3 * (getattr(st1, k) - getattr(st0, k)) / steps
                    for k in ("forward_s", "executor_rpc_s", "schedule_s")}
        return {"wall_s": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
                "steps": steps, "wall_ms_per_step": 1e3 * wall / steps, **per_step,
                "cpu_s": cpu, "cpu_ms_per_output_token": 1e3 * sum(cpu.values()) / tokens,
                "services_cpu_ms_per_output_token":
                    1e3 * sum(v for n, v in cpu.items() if not n.startswith("executor")) / tokens}

    def stop(self) -> None:
        try:
            for pid in self.pids().values():  # a frozen process cannot act on SIGTERM
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            self.sup.stop()
        finally:
            self._dir.cleanup()

    def spans(self) -> int:
        path = self.run_dir / "traces.jsonl"
        return sum(1 for _ in open(path)) if path.exists() else 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmesh.benchmarks.tracing_overhead")
    p.add_argument("--model", help="model directory (default: the bench preset)")
    p.add_argument("--requests", type=int, default=16, help="requests per segment")
    p.add_argument("--pairs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--control", action="store_true",
                   help="an A/A run: tracing off in both meshes, to see the pair ratio's own spread")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from llmesh.mesh.default_model import default_model_dir
    model_dir = str(args.model or default_model_dir("bench"))
    mc = load_model_config(model_dir)
    limits = EngineLimits(num_kv_blocks=4096, max_num_batched_tokens=1024, max_num_seqs=64)
    settle_s = EXPORT_INTERVAL_MS / 1e3 + 0.5
    on = (ObservabilityConfig(tracing="off") if args.control
          else ObservabilityConfig(tracing="file", sample_ratio=1.0))
    meshes = {"on": _Mesh("on", model_dir, limits, on),
              "off": _Mesh("off", model_dir, limits, ObservabilityConfig(tracing="off"))}
    warm = workload(4, mc.vocab_size, args.seed + 10_000)
    pairs: list[dict] = []
    try:
        for m in meshes.values():  # one up and warm at a time, the other frozen
            m.start()
            m.segment(warm, settle_s)
            m.freeze()
        spans0 = meshes["on"].spans()
        for i in range(args.pairs):
            reqs = workload(args.requests, mc.vocab_size, args.seed + i)
            pair = {}
            for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
                m = meshes[mode]
                m.thaw()
                pair[mode] = m.segment(reqs, settle_s)
                m.freeze()
            pair["ratio"] = pair["on"]["output_tokens_per_s"] / pair["off"]["output_tokens_per_s"]
            pair["cpu_ratio"] = (pair["on"]["cpu_ms_per_output_token"]
                                 / pair["off"]["cpu_ms_per_output_token"])
            log(f"[tracing] pair {i + 1}/{args.pairs}: on {pair['on']['output_tokens_per_s']:.1f}, "
                f"off {pair['off']['output_tokens_per_s']:.1f} tok/s, on/off {pair['ratio']:.3f}; "
                f"CPU/token on/off {pair['cpu_ratio']:.3f}")
            pairs.append(pair)
        spans = meshes["on"].spans() - spans0
    finally:
        for m in meshes.values():
            m.stop()
    summary = _summary(pairs, spans, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"model_dir": model_dir, "model": dataclasses.asdict(mc),
                                               "pairs": pairs, "summary": summary}, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


def _summary(pairs: list[dict], spans: int, args) -> dict:
    def med(f):
        return statistics.median(f(p) for p in pairs)

    ratios = sorted(p["ratio"] for p in pairs)
    names = set(pairs[0]["on"]["cpu_s"]) | set(pairs[0]["off"]["cpu_s"])
    per_process = {n: {mode: med(lambda p: 1e3 * p[mode]["cpu_s"].get(n, 0.0)
                                  / p[mode]["output_tokens"]) for mode in ("on", "off")}
                   for n in sorted(names)}
    tokens_on = sum(p["on"]["output_tokens"] for p in pairs)
    return {
        "pairs": len(pairs), "requests_per_segment": args.requests, "control": args.control,
        "median_on_over_off": med(lambda p: p["ratio"]),
        "quartiles_on_over_off": [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]],
        "pairs_on_faster": sum(r > 1 for r in ratios),
        "tok_s_on_median": med(lambda p: p["on"]["output_tokens_per_s"]),
        "tok_s_off_median": med(lambda p: p["off"]["output_tokens_per_s"]),
        "median_cpu_on_over_off": med(lambda p: p["cpu_ratio"]),
        "cpu_ms_per_token_on": med(lambda p: p["on"]["cpu_ms_per_output_token"]),
        "cpu_ms_per_token_off": med(lambda p: p["off"]["cpu_ms_per_output_token"]),
        "services_cpu_ms_per_token_on": med(lambda p: p["on"]["services_cpu_ms_per_output_token"]),
        "services_cpu_ms_per_token_off": med(lambda p: p["off"]["services_cpu_ms_per_output_token"]),
        # where a step's time goes: the executor's forward, its round trip, the scheduler
        "per_step_ms": {k: {mode: med(lambda p: p[mode][k]) for mode in ("on", "off")}
                        for k in ("wall_ms_per_step", "forward_s_ms_per_step",
                                  "executor_rpc_s_ms_per_step", "schedule_s_ms_per_step")},
        "cpu_ms_per_token_by_process": per_process,
        "spans_exported": spans, "spans_per_output_token": spans / tokens_on,
    }


if __name__ == "__main__":
    sys.exit(main())
