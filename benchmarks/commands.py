"""`llmesh bench`: offline | online (the serving harness), workload, and every
standalone benchmark's spec (`llmesh bench chaos ...` is `python -m llmesh.benchmarks.chaos
...`; gpu and kernels are gpu_bench and gpu_kernels). Registered with `llmesh` by the
`llmesh.cli` entry point."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import shlex
import sys

from llmesh.benchmarks import arrivals as arrivals_mod
from llmesh.benchmarks import workload as workload_mod
from llmesh.benchmarks.metrics import parse_slo

DEFAULT_ONLINE_TARGETS = "engine,mesh"
# command -> module
SPECS = {"gpu": "gpu_bench", "kernels": "gpu_kernels", **{m.replace("_", "-"): m for m in (
    "agent_loop", "autoscale", "chaos", "cpu_runtime", "kv_cache_sim", "kv_routing", "loop_overhead",
    "model_quality", "overload", "priorities", "quant_quality", "soak", "step_overhead",
    "speculative", "stream_latency", "structured_cost", "tp", "tracing_overhead")}}


def add_bench_parsers(sub) -> None:
    parser = sub.add_parser("bench", help="benchmarks")
    parser.set_defaults(run=run_bench_cli)
    bench = parser.add_subparsers(dest="bench_cmd", required=True, parser_class=BenchParser)

    off = bench.add_parser("offline", help="offline throughput: all requests at once")
    _common(off, default_targets="engine,hf-static,hf-cb")
    off.add_argument("--num-requests", type=int, default=256)

    on = bench.add_parser("online", help="serving: requests arrive over time; rate sweeps")
    _common(on, default_targets=DEFAULT_ONLINE_TARGETS)
    on.add_argument("--arrival", default="poisson", choices=arrivals_mod.KINDS)
    on.add_argument("--rate", type=float, help="requests/s (poisson, gamma)")
    on.add_argument("--rates", help="comma-separated rates: one run per rate (a sweep)")
    on.add_argument("--burstiness", type=float, default=1.0,
                    help="gamma shape: 1 = Poisson, < 1 burstier")
    on.add_argument("--concurrency", help="requests in flight (concurrency arrivals); "
                                          "a comma-separated list sweeps it")
    on.add_argument("--duration", type=float, help="seconds of arrivals per run")
    on.add_argument("--num-requests", type=int, help="requests per run (with or instead of "
                                                     "--duration; needed for offline arrivals)")

    wl = bench.add_parser("workload", help="write a seeded workload as JSONL")
    wl.add_argument("name", choices=workload_mod.BUILTIN)
    wl.add_argument("--out", required=True)
    wl.add_argument("--num-requests", type=int, default=256)
    wl.add_argument("--model", help="model directory (vocabulary and context; default: bench preset)")
    wl.add_argument("--seed", type=int, default=0)
    wl.add_argument("--max-prompt", type=int, default=1024)
    wl.add_argument("--max-output", type=int, default=512)

    for command, module in SPECS.items():
        bench.add_parser(command, help=_first_line(module), spec_module=module)


class BenchParser(argparse.ArgumentParser):
    """A `llmesh bench` subcommand's parser. A spec's flags are added, and so its module
    imported (torch, often), only when that subcommand runs."""

    def __init__(self, *args, spec_module: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.spec_module = spec_module

    def parse_known_args(self, args=None, namespace=None):
        if self.spec_module:
            from llmesh.benchmarks import kit
            spec = importlib.import_module(f"llmesh.benchmarks.{self.spec_module}").SPEC
            self.description, self.spec_module = spec.doc, None
            self.formatter_class = argparse.RawDescriptionHelpFormatter
            kit.add_options(self, spec)
            self.set_defaults(run=lambda a: kit.execute(spec, a, shlex.join(["llmesh", *sys.argv[1:]])))
        return super().parse_known_args(args, namespace)


def _first_line(module: str) -> str:
    """A spec's help line, read from its docstring without importing it: the module
    compiled, not run (nor parsed to an AST: CPython 3.11.7's conversion of one to
    Python objects fails with a SystemError, "AST constructor recursion depth
    mismatch", when another thread converts one at the same time, gh-106905; it did
    once in the test suite)."""
    origin = importlib.util.find_spec(f"llmesh.benchmarks.{module}").origin
    with open(origin) as f:
        code = compile(f.read(), origin, "exec", optimize=0)  # (-OO would drop docstrings)
    # (a module with a docstring stores its first constant as __doc__ first)
    if not code.co_names or code.co_names[0] != "__doc__" \
            or not isinstance(code.co_consts[0], str):
        raise ValueError(f"benchmark module {module} has no docstring")
    return " ".join(code.co_consts[0].split("\n\n")[0].split())


def _common(p, default_targets: str) -> None:
    p.add_argument("--model", help="model directory (default: the bench preset)")
    p.add_argument("--config", help="mesh.yaml: the mesh target's topology and limits; the "
                                    "engine target gets the same limits")
    p.add_argument("--endpoint", help="Envoy host:port of a mesh already up (`llmesh up "
                                      "--config FILE`) instead of starting one")
    p.add_argument("--targets", default=default_targets,
                   help="comma-separated: engine, mesh, openai, hf-static, hf-cb")
    p.add_argument("--openai-url", help="the openai target: an OpenAI-compatible server's /v1 "
                                        "URL (default: this mesh's HTTP API)")
    p.add_argument("--openai-model", default="", help="model name for --openai-url "
                                                      "(default: its first /v1/models entry)")
    p.add_argument("--openai-api-key", default="")
    p.add_argument("--workload", default="chat",
                   help=f"{', '.join(workload_mod.BUILTIN)}, a .jsonl file or a ShareGPT .json file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--max-output", type=int, default=512)
    p.add_argument("--slo", help="goodput SLOs, e.g. ttft_ms=500,tpot_ms=100 (also e2e_ms)")
    p.add_argument("--baseline", help="target the ratios compare against (default: engine)")
    p.add_argument("--json", dest="json_out", help="write the report here (and OUT.md, OUT-plots/)")
    p.add_argument("--markdown", help="Markdown table path (default: next to --json)")
    p.add_argument("--plots", help="directory for the PNG plots (default: next to --json)")
    p.add_argument("--sample-interval", type=float, default=0.1,
                   help="seconds between KV usage samples")
    p.add_argument("--drain-timeout", type=float, default=3600.0,
                   help="seconds to wait for requests after the last arrival")
    p.add_argument("--dtype", help="weights of the engine and mesh targets: float32, bfloat16, "
                                   "float16, int8 or float16-weights (default: the config's)")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--no-progress", action="store_true")


def run_bench_cli(args) -> int:
    if args.bench_cmd == "workload":
        return _write_workload(args)
    from llmesh.benchmarks.harness import run_bench
    from llmesh.benchmarks.report import default_paths, markdown, write_outputs
    setup = build_setup(args)
    result = run_bench(setup, json_out=args.json_out)
    md_out, plots = args.markdown, args.plots
    if args.json_out:
        default_md, default_plots = default_paths(args.json_out)
        md_out, plots = md_out or default_md, plots or default_plots
    for path in write_outputs(result.report, args.json_out, md_out, plots):
        print(f"[bench] wrote {path}", file=sys.stderr)
    print(markdown(result.report), end="")
    return 1 if result.report.get("failed_targets") else 0


def runs_from_args(args) -> list:
    from llmesh.benchmarks.arrivals import ArrivalSpec
    from llmesh.benchmarks.harness import RunSpec
    kind = "offline" if args.bench_cmd == "offline" else args.arrival
    if kind == "offline":
        if not args.num_requests:
            raise ValueError("offline arrivals need --num-requests")
        return [RunSpec(ArrivalSpec("offline"), num_requests=args.num_requests)]
    if args.num_requests is None and args.duration is None:
        raise ValueError("give --duration and/or --num-requests")
    if kind == "concurrency":
        if not args.concurrency:
            raise ValueError("concurrency arrivals need --concurrency")
        points = [ArrivalSpec("concurrency", concurrency=int(c))
                  for c in str(args.concurrency).split(",") if c.strip()]
    elif args.rates or args.rate is not None:
        points = [ArrivalSpec(kind, rate=r, burstiness=args.burstiness)
                  for r in arrivals_mod.parse_rates(args.rates or str(args.rate))]
    else:
        raise ValueError(f"{kind} arrivals need --rate or --rates")
    return [RunSpec(a, args.num_requests, args.duration) for a in points]


def build_setup(args):
    from llmesh.benchmarks.harness import (BENCH_ENGINE_CONFIG, BenchSetup, context_limit,
                                    engine_config_for)
    from llmesh.services.executor.model_config import load_model_config
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    mesh_config, endpoint, schedulers = None, None, []
    model_dir = args.model
    if args.config:
        from llmesh.mesh.config import load_config
        mesh_config = load_config(args.config)
        model_dir = model_dir or mesh_config.model or None
    if args.endpoint:
        endpoint, schedulers = args.endpoint, _running_schedulers(args.config)
    elif mesh_config is not None:  # a mesh the benchmark starts: never on the config's fixed ports
        mesh_config = dataclasses.replace(mesh_config, envoy=dataclasses.replace(
            mesh_config.envoy, port=0, admin_port=0))
    if not model_dir:
        from llmesh.mesh.default_model import default_model_dir
        model_dir = default_model_dir("bench")
    engine_config = engine_config_for(mesh_config) if mesh_config is not None else BENCH_ENGINE_CONFIG
    if args.dtype:
        engine_config = dataclasses.replace(engine_config, dtype=args.dtype)
        if mesh_config is not None:
            mesh_config = dataclasses.replace(mesh_config, engine=dataclasses.replace(
                mesh_config.engine, dtype=args.dtype))
    model_config = load_model_config(model_dir)
    limit = context_limit(model_config, engine_config,
                          mesh_config if {"mesh", "openai"} & set(names) else None)
    wl = workload_mod.load(args.workload, model_config.vocab_size, limit, args.seed,
                           args.max_prompt, args.max_output, model_config.bos_token_id or 0,
                           model_dir)
    return BenchSetup(
        model_dir=str(model_dir), workload=wl, target_names=names, runs=runs_from_args(args),
        engine_config=engine_config, mesh_config=mesh_config, mesh_endpoint=endpoint,
        mesh_schedulers=schedulers, openai_url=args.openai_url, openai_model=args.openai_model,
        openai_api_key=args.openai_api_key, slo=parse_slo(args.slo), baseline=args.baseline,
        seed=args.seed, sample_interval_s=args.sample_interval,
        drain_timeout_s=args.drain_timeout, hf_batch_size=args.hf_batch_size,
        max_output=args.max_output, show_progress=not args.no_progress,
        command=shlex.join(["llmesh", *sys.argv[1:]]))


def _running_schedulers(config_path: str | None) -> list[str]:
    """Scheduler addresses of the mesh `llmesh up --config FILE` brought up (for GetStats)."""
    from llmesh.mesh.commands import effective_config, read_state, run_dir_of
    state = read_state(run_dir_of(effective_config(config_path))) or {}
    replicas = (state.get("config") or {}).get("replica_ports") or []
    return [f"127.0.0.1:{r['scheduler']}" for r in replicas]


def _write_workload(args) -> int:
    from llmesh.services.executor.model_config import load_model_config
    model_dir = args.model
    if not model_dir:
        from llmesh.mesh.default_model import default_model_dir
        model_dir = default_model_dir("bench")
    mc = load_model_config(model_dir)
    wl = workload_mod.builtin(args.name, mc.vocab_size, mc.max_position_embeddings, args.seed,
                              args.max_prompt, args.max_output, mc.bos_token_id or 0)
    print(workload_mod.write_jsonl(args.out, wl, args.num_requests))
    return 0
