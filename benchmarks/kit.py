"""What every benchmark shares: its command line and results file (a `Spec` run by
`main`), meshes on free loopback ports (`BenchMesh`), the gRPC client that loads
them (`request`, `generate`, `load`), process figures, and medians over rounds
whose order alternates."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


# ---- a benchmark: its command line and its results file ------------------------------
@dataclass(frozen=True)
class Spec:
    """One benchmark. `options(parser)` adds its flags to the shared ones (--model,
    --json); `run(args)` measures and returns the results (JSON-ready)."""

    module: str  # llmesh.benchmarks.<module>
    doc: str  # its docstring: the first line is the help line, the rest the description
    options: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict]
    model: str | None = "tiny"  # --model's default (resolve_model); None: no --model
    json: str | None = None  # --json's default
    passed: Callable[[dict], bool] = lambda result: True  # exit status 0 when true
    table: Callable[[dict], str] | None = None  # printed instead of the JSON


def parser(spec: Spec) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m llmesh.benchmarks.{spec.module}",
                                description=spec.doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, spec)
    return p


def add_options(p: argparse.ArgumentParser, spec: Spec) -> None:
    """The shared flags (--model, --json), then the benchmark's own."""
    if spec.model is not None:
        p.add_argument("--model", default=spec.model, help="a model directory, a .gguf, tiny, "
                       f"bench or smollm2 (default: {spec.model})")
    p.add_argument("--json", default=spec.json, help="write the results here")
    spec.options(p)


def main(spec: Spec, argv: list[str] | None = None) -> int:
    """`python -m llmesh.benchmarks.MODULE`: parse, then `execute` (exit status 2, as
    `llmesh bench`'s, when it refuses its arguments or the machine with a ValueError)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser(spec)
    try:
        return execute(spec, p.parse_args(argv), " ".join([p.prog, shlex.join(argv)]).strip())
    except ValueError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2


def execute(spec: Spec, args: argparse.Namespace, command: str) -> int:
    """Run, write the results file (which records `command`), print."""
    if spec.model is not None:
        from llmesh.mesh.default_model import resolve_model
        args.model = str(resolve_model(args.model))
    result = spec.run(args)
    options = {k: v for k, v in vars(args).items() if not callable(v)}
    report = write_results(result, args.json, command, options)
    print(spec.table(report) if spec.table else json.dumps(report, indent=2, default=str))
    return 0 if spec.passed(result) else 1


def stamp(command: str, args: dict | None = None) -> dict:
    """Where and how a results file was made: the command, its arguments, the machine,
    the versions (git commit included) and the time."""
    from llmesh.benchmarks.machine import machine_info, versions
    return {"command": command, **({"args": args} if args is not None else {}),
            "machine": machine_info(), "versions": versions(),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_results(result: dict, path: str | Path | None, command: str,
                  args: dict | None = None) -> dict:
    """`result` with its stamp, written to `path` when given; returns the whole report."""
    report = {**stamp(command, args), **result}
    if path:
        write_json(report, path)
        print(f"[bench] wrote {path}", file=sys.stderr)
    return report


def write_json(report: dict, path: str | Path) -> None:
    """Indented, with the innermost lists (quantiles, samples, request rows) on one line."""
    text = json.dumps(report, indent=1, default=str)
    text = re.sub(r"\[[^\[\]{}]*\]", lambda m: re.sub(r"\n\s*", " ", m.group(0)), text)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- meshes -------------------------------------------------------------------------
def _merge(base: dict, over: dict) -> dict:
    return {**base, **{k: _merge(base[k], v) if isinstance(v, dict) and isinstance(
        base.get(k), dict) else v for k, v in over.items()}}


class BenchMesh:
    """A mesh on free loopback ports in a run directory of its own, for the length of a
    `with` (or start() ... stop()). Its config is `cfg` (default: one replica, tracing
    and metrics off) with `overrides` (mesh.yaml keys; dicts merge) on top. One with
    the autoscaler on is brought up by `llmesh up --detach`, whose process runs it."""

    def __init__(self, model_dir, cfg=None, name: str = "bench", start_timeout_s: float = 300,
                 stop_timeout_s: float = 10.0, **overrides):
        from llmesh.mesh.config import parse_config
        from llmesh.mesh.ports import resolve_ports
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"llmesh-{name}-"))
        raw = cfg.to_dict() if cfg is not None else {
            "observability": {"tracing": "off", "metrics": False}}
        raw = _merge(raw, {**overrides, "model": str(model_dir), "run_dir": str(self.run_dir),
                           "envoy": {"port": 0, "admin_port": 0}})
        self.cfg = resolve_ports(parse_config(raw))
        self.model_dir = str(model_dir)
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self.detached = self.cfg.autoscaler.enabled
        self.sup = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.cfg.envoy.port}"

    @property
    def schedulers(self) -> list[str]:
        return [f"127.0.0.1:{r.scheduler}" for r in self.cfg.replica_ports]

    def start(self) -> "BenchMesh":
        if self.detached:
            self._cli("up", "--detach")
        else:
            from llmesh.mesh.supervisor import Supervisor, build_specs
            self.sup = Supervisor(build_specs(self.cfg, self.model_dir, self.run_dir), self.run_dir)
            self.sup.start(timeout_s=self.start_timeout_s)
        return self

    def stop(self) -> None:
        for pid in self.pids().values():  # a frozen process cannot act on SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if self.detached:
            self._cli("down", check=False)
        elif self.sup is not None:
            self.sup.stop(timeout_s=self.stop_timeout_s)

    def __enter__(self) -> "BenchMesh":
        return self.start()

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _cli(self, *args: str, check: bool = True) -> None:
        import yaml
        path = self.run_dir / "mesh.yaml"
        path.write_text(yaml.safe_dump(self.cfg.to_dict()))
        out = subprocess.run([sys.executable, "-m", "llmesh.mesh.cli", *args, "--config",
                              str(path)], capture_output=True, text=True, timeout=600)
        if check and out.returncode != 0:
            raise RuntimeError(f"llmesh {' '.join(args)} failed: {out.stderr[-2000:]}")

    def state(self) -> dict:
        """A detached mesh's state.json (replicas, warm pool, pids, joins)."""
        return json.loads((self.run_dir / "state.json").read_text())

    def pids(self) -> dict[str, int]:
        if self.detached:
            return self.state().get("pids", {}) if (self.run_dir / "state.json").exists() else {}
        return self.sup.pids() if self.sup is not None else {}

    def cpu_s(self) -> dict[str, float]:
        return {n: cpu_s(p) for n, p in self.pids().items()}

    def rss_mib(self) -> dict[str, float]:
        return {n: rss_bytes(p) / 2**20 for n, p in self.pids().items()}

    def stats(self, replica: int = 0):
        """The replica's scheduler GetStats."""
        import grpc
        from llmesh.v1 import scheduler_pb2, scheduler_pb2_grpc
        with grpc.insecure_channel(self.schedulers[replica]) as ch:
            return scheduler_pb2_grpc.SchedulerStub(ch).GetStats(scheduler_pb2.GetStatsRequest(),
                                                                 timeout=10)

    def freeze(self) -> None:
        """Every process stopped (SIGSTOP): it takes no CPU until thaw()."""
        for pid in self.pids().values():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        from llmesh.mesh.supervisor import envoy_ready
        for pid in self.pids().values():
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 30  # Envoy's health checks may need a round to agree
        while not envoy_ready(self.cfg.envoy.admin_port):
            if time.monotonic() > deadline:
                raise RuntimeError("Envoy sees no healthy router after thaw")
            time.sleep(0.1)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (0 when it is gone). Unlike wall
    time this does not grow when other tenants of the machine steal cycles."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---- the client ---------------------------------------------------------------------
def request(prompt: str | list[int], max_tokens: int, priority: int = 0, **sampling):
    """A GenerateRequest: text or token ids, `ignore_eos` unless `sampling` says otherwise."""
    from llmesh.v1 import common_pb2, inference_pb2
    req = inference_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(
        max_tokens=max_tokens, **{"ignore_eos": True, **sampling}), priority=priority)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


async def generate(stub, req, timeout_s: float = 600) -> dict:
    """One Generate call read to its end: status, TTFT, the tokens, the server's usage,
    each token message's delay from its emission on the scheduler, a refusal's retry hint."""
    import grpc
    t0 = time.monotonic()
    out = {"start": t0, "status": "OK", "ttft_s": None, "tokens": [], "usage": None,
           "emitted_delays_s": [], "retry_hint": False}
    try:
        async for chunk in stub.Generate(req, timeout=timeout_s):
            now, wall = time.monotonic(), time.time()
            if chunk.token_ids:
                out["ttft_s"] = out["ttft_s"] if out["ttft_s"] is not None else now - t0
                out["tokens"] += chunk.token_ids
                out["emitted_delays_s"].append(wall - chunk.emitted_unix_s)
            if chunk.HasField("usage"):
                out["usage"] = chunk.usage
    except grpc.aio.AioRpcError as e:
        out["status"] = e.code().name
        out["retry_hint"] = any(k == "retry-after-ms" for k, _ in (e.trailing_metadata() or ()))
    out["end"] = time.monotonic()
    return out


async def load(endpoint: str, make: Callable[[int], object], count: int | None = None,
               duration_s: float | None = None, rate: float | None = None,
               concurrency: int | None = None, seed=None, timeout_s: float = 600) -> list[dict]:
    """Requests `make(0)`, `make(1)`, ... sent through `endpoint`; their answers
    (`generate`) in the order sent. `concurrency`: that many closed-loop clients, each
    sending its next request once its last is answered; else `rate` per second (evenly
    spaced, or Poisson arrivals from `seed`); else all at once. Sending stops after
    `count` requests or `duration_s` seconds."""
    import grpc
    from llmesh.v1 import inference_pb2_grpc
    count = math.inf if count is None else count
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        t0 = time.monotonic()
        end = t0 + duration_s if duration_s else math.inf
        if concurrency:
            done, numbers = [], itertools.count()

            async def client() -> None:
                while (i := next(numbers)) < count and time.monotonic() < end:
                    done.append((i, await generate(stub, make(i), timeout_s)))
            await asyncio.gather(*(client() for _ in range(concurrency)))
            return [answer for _, answer in sorted(done, key=lambda d: d[0])]
        rng, tasks, t = random.Random(seed), [], t0
        while len(tasks) < count:
            if rate:
                t = t + rng.expovariate(rate) if seed is not None else t0 + len(tasks) / rate
            if t >= end:
                break
            await asyncio.sleep(max(0.0, t - time.monotonic()))
            tasks.append(asyncio.ensure_future(generate(stub, make(len(tasks)), timeout_s)))
        return list(await asyncio.gather(*tasks))


def wall_s(answers: list[dict]) -> float:
    """From the first request sent to the last answer's end."""
    return max(a["end"] for a in answers) - min(a["start"] for a in answers)


def num_tokens(answers: list[dict]) -> int:
    return sum(len(a["tokens"]) for a in answers)


# ---- figures ------------------------------------------------------------------------
def percentiles(values_s: list[float]) -> dict:
    """count, mean, p50 / p90 / p99 and max in milliseconds."""
    from llmesh.benchmarks.metrics import distribution
    return {k: v for k, v in distribution([v for v in values_s if v is not None]).items()
            if k != "quantiles"}


def alternate(rounds: int, configs: list, run: Callable) -> dict:
    """`run(config)` for each config in every round, the order reversed every other round
    (no config always goes first); config -> its results, round by round."""
    out: dict = {c: [] for c in configs}
    for r in range(rounds):
        for c in (configs if r % 2 == 0 else configs[::-1]):
            out[c].append(run(c))
    return out


def md_table(head: list[str], rows: list[list], align: str | None = None) -> str:
    """A Markdown table; `align` one letter a column, l or r (default: the first column
    left, the others right)."""
    align = align or "l" + "r" * (len(head) - 1)
    return "\n".join(["| " + " | ".join(head) + " |",
                      "|" + "".join("---|" if a == "l" else "---:|" for a in align)]
                     + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def medians(rows: list[dict], keys=None) -> dict:
    """Per key, the median over the rows that have a number for it."""
    out = {}
    for key in (keys or (rows[0] if rows else {})):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))
                  and not isinstance(r.get(key), bool)]
        out[key] = statistics.median(values) if values else None
    return out
