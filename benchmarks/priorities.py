"""Priority classes on versus off: the same mesh, the same seeded bursty workload of
interactive and batch requests, alternating rounds in one run.

Each request is tagged with a class, drawn from the seed: `--interactive-share` of them
interactive (short prompts, short outputs), the rest batch (chat-length prompts, longer
outputs). Arrivals are Poisson at `--rate` requests/s with the `bursty` workload's spike
(10x the rate from 40% to 60% of `--duration`), so the burst overloads the mesh and
requests queue at the scheduler. The two meshes differ only in `admission.priorities`
(tracing off in both); every class queue is unbounded in both, so nothing is shed for
lack of room and the comparison is about ordering (rejections, if any, show up under
errors). A request is good when it completes and meets its class's SLO (an empty SLO:
completing is enough). Preemptions are the scheduler's (GetStats num_preemptions).

Reported per run and as medians over the rounds, with the on/off ratio: interactive and
batch TTFT p50/p99, output tokens/s, goodput, errors by status, preemptions; and per run
the step time split, the machine's CPU shares (steal: time other VMs took) and a 1 s
timeline of running / waiting sequences.

Sizing (bench checkpoint, 2-core CPU machine, default limits): this mix saturates the
mesh at about 2.7 requests/s (280 output tok/s, 64 sequences running; 200 requests sent
at once), and less when the machine is shared. The default 1 request/s is well under
that outside the burst and about 4x over it inside, and a default run (2 rounds, 4
meshes) takes about 5 to 8 minutes. With --model tiny the mesh saturates near 28
requests/s, and the Python client, router and Envoy then share the 2 cores with it.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Iterator

from llmesh.benchmarks import kit
from llmesh.benchmarks.kit import medians
from llmesh.benchmarks.metrics import RequestRecord, meets_slo, parse_slo, summarize
from llmesh.benchmarks.workload import (BURST, BenchRequest, Workload, _fit, _random_tokens, _rng,
                                 long_tailed)

CLASSES = ("interactive", "batch")
MODES = ("on", "off")
DEFAULT_JSON = "benchmarks/results/priorities.json"
# every class queue unbounded (0), so neither run sheds load for lack of room
UNBOUNDED = {c: {"max_queued_requests": 0, "max_queued_tokens": 0}
             for c in ("interactive", "standard", "batch")}


# ---- the workload ---------------------------------------------------------------
def classed(vocab_size: int, max_model_len: int, seed: int = 0, interactive_share: float = 0.3,
            bos_token_id: int = 0, burst: dict | None = BURST) -> Workload:
    """Requests tagged with a class from the seed. Interactive: prompts 8..128 tokens
    (median 32), outputs 4..32 (median 16). Batch: prompts 16..512 (median 128), outputs
    32..256 (median 128)."""
    if not 0.0 <= interactive_share <= 1.0:
        raise ValueError("interactive_share must be within [0, 1]")

    def stream(part: int) -> Iterator[BenchRequest]:
        rng = _rng(seed, part)
        while True:
            if rng.random() < interactive_share:
                cls = "interactive"
                num_prompt = long_tailed(rng, 32, 0.6, 8, 128)
                num_output = long_tailed(rng, 16, 0.5, 4, 32)
            else:
                cls = "batch"
                num_prompt = long_tailed(rng, 128, 0.9, 16, 512)
                num_output = long_tailed(rng, 128, 0.5, 32, 256)
            prompt = [bos_token_id] + _random_tokens(rng, num_prompt - 1, vocab_size)
            num_prompt, num_output = _fit(num_prompt, num_output, max_model_len)
            yield BenchRequest(prompt[:num_prompt], num_output, cls)

    meta = {"name": "bursty-classes", "seed": seed, "interactive_share": interactive_share}
    if burst:
        meta["burst"] = dict(burst)
    return Workload(meta["name"], meta, stream)


# ---- the figures (pure: records in, numbers out) -------------------------------------
def summarize_run(records: list[RequestRecord], classes: list[str], start_s: float,
                  slos: dict[str, dict]) -> dict:
    """One run's figures: overall (throughput, errors, goodput) and per class (TTFT, TPOT,
    end-to-end percentiles of the completed requests; goodput under the class's SLO).
    `classes[rec.index]` is the class of each record."""
    overall = summarize(records, start_s, {})
    by_class: dict[str, list[RequestRecord]] = {}
    for rec in records:
        by_class.setdefault(classes[rec.index], []).append(rec)
    per_class, num_good = {}, 0
    for cls in [c for c in CLASSES if c in by_class] + sorted(set(by_class) - set(CLASSES)):
        recs, slo = by_class[cls], slos.get(cls, {})
        fig = summarize(recs, start_s, {})
        met = sum(meets_slo(r, slo) for r in recs)
        num_good += met
        per_class[cls] = {
            **{k: fig[k] for k in ("num_requests", "num_ok", "status_counts", "output_tokens")},
            **{k: {q: v for q, v in fig[k].items() if q != "quantiles"}
               for k in ("ttft_ms", "tpot_ms", "e2e_ms")},
            "goodput": {"slo": dict(slo), "num_met": met, "fraction": met / len(recs)}}
        if "ttft_ms" in slo:  # the TTFT part alone: ordering, apart from step time
            met_ttft = sum(meets_slo(r, {"ttft_ms": slo["ttft_ms"]}) for r in recs)
            per_class[cls]["goodput"]["ttft_only_fraction"] = met_ttft / len(recs)
    duration = overall["duration_s"]
    return {
        **{k: overall[k] for k in ("num_requests", "num_ok", "status_counts", "duration_s",
                                   "output_tokens", "output_tokens_per_s", "request_throughput")},
        "errors": {k: v for k, v in overall["status_counts"].items() if k != "OK"},
        "goodput": {"num_met": num_good,
                    "fraction": num_good / len(records) if records else 0.0,
                    "requests_per_s": num_good / duration},
        "classes": per_class,
    }


# the table's rows: (label, key in a run's headline, format, where the run's figures hold it)
ROWS = (
    ("interactive TTFT p50 (ms)", "interactive_ttft_p50_ms", "{:.0f}",
     ("classes", "interactive", "ttft_ms", "p50")),
    ("interactive TTFT p99 (ms)", "interactive_ttft_p99_ms", "{:.0f}",
     ("classes", "interactive", "ttft_ms", "p99")),
    ("batch TTFT p50 (ms)", "batch_ttft_p50_ms", "{:.0f}", ("classes", "batch", "ttft_ms", "p50")),
    ("batch TTFT p99 (ms)", "batch_ttft_p99_ms", "{:.0f}", ("classes", "batch", "ttft_ms", "p99")),
    ("interactive TPOT p99 (ms)", "interactive_tpot_p99_ms", "{:.0f}",
     ("classes", "interactive", "tpot_ms", "p99")),
    ("output tok/s", "output_tokens_per_s", "{:.1f}", ("output_tokens_per_s",)),
    ("goodput, all (% good)", "goodput_fraction", "{:.1%}", ("goodput", "fraction")),
    ("goodput, interactive (% good)", "interactive_goodput_fraction", "{:.1%}",
     ("classes", "interactive", "goodput", "fraction")),
    ("interactive within the TTFT part of its SLO (%)", "interactive_ttft_slo_fraction",
     "{:.1%}", ("classes", "interactive", "goodput", "ttft_only_fraction")),
    ("goodput, batch (% good)", "batch_goodput_fraction", "{:.1%}",
     ("classes", "batch", "goodput", "fraction")),
    ("goodput (good req/s)", "goodput_requests_per_s", "{:.2f}", ("goodput", "requests_per_s")),
    ("errors (not OK)", "errors", "{:g}", ("errors",)),
    ("preemptions", "preemptions", "{:g}", ("preemptions",)),
    ("mean step (ms)", "mean_step_ms", "{:.0f}", ("mean_step_ms",)),
    ("CPU steal (% of machine)", "cpu_steal", "{:.1%}", ("cpu_share", "steal")))


def headline(run: dict) -> dict:
    """The figures the table shows, flat: one number (or None) per key."""
    def get(path):
        v = run
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        return sum(v.values()) if isinstance(v, dict) else v  # (errors: by status)
    return {key: get(path) for _, key, _, path in ROWS}


def ratios(on: dict, off: dict) -> dict:
    """on / off per key (None where off is 0 or either is missing)."""
    return {k: (on[k] / off[k] if on.get(k) is not None and off.get(k) else None) for k in on}


def _fmt(fmt: str, v) -> str:
    return "n/a" if v is None else fmt.format(v)


def markdown(summary: dict) -> str:
    med, ratio = summary["median"], summary["on_over_off"]
    return kit.md_table(
        [f"median of {summary['rounds']} rounds", "priorities on", "priorities off", "on/off"],
        [[label, _fmt(fmt, med["on"].get(key)), _fmt(fmt, med["off"].get(key)),
          _fmt("{:.2f}", ratio.get(key))] for label, key, fmt, _ in ROWS])


def markdown_rounds(runs: dict[str, list[dict]]) -> str:
    keys = ("interactive_ttft_p50_ms", "interactive_ttft_p99_ms", "batch_ttft_p50_ms",
            "batch_ttft_p99_ms", "output_tokens_per_s", "goodput_fraction", "preemptions")
    fmts = {k: f for _, k, f, _ in ROWS}
    return kit.md_table(
        ["round", "priorities", "int. TTFT p50", "int. TTFT p99", "batch TTFT p50",
         "batch TTFT p99", "tok/s", "good", "preemptions", "statuses"],
        [[i, mode, *(_fmt(fmts[k], run["headline"][k]) for k in keys), run["status_counts"]]
         for mode in MODES for i, run in enumerate(runs[mode])], "ll" + "r" * 7 + "l")


def summarize_rounds(runs: dict[str, list[dict]]) -> dict:
    med = {m: medians([r["headline"] for r in runs[m]]) for m in MODES}
    return {"rounds": min(len(runs[m]) for m in MODES), "median": med,
            "on_over_off": ratios(med["on"], med["off"])}


# ---- running it -------------------------------------------------------------------
def mesh_config(limits, priorities: bool):
    from llmesh.mesh.config import AdmissionConfig, EnvoyConfig, MeshConfig, ObservabilityConfig
    return MeshConfig(engine=limits, envoy=EnvoyConfig(port=0, admin_port=0),
                      observability=ObservabilityConfig(tracing="off"),
                      admission=AdmissionConfig(priorities=priorities, classes=UNBOUNDED))


def run_once(model_dir: str, workload: Workload, classes: list[str], offsets: list[float], cfg,
             spec, args, slos: dict) -> dict:
    """Bring the mesh up, play the run through Envoy, bring it down; this run's figures."""
    from llmesh.benchmarks.harness import BenchSetup, run_bench
    setup = BenchSetup(model_dir=model_dir, workload=workload, target_names=["mesh"],
                       runs=[spec], mesh_config=cfg, seed=args.seed,
                       drain_timeout_s=args.drain_timeout, show_progress=False,
                       bandwidth_bytes=16 * 2**20, log=kit.log)
    cpu0 = cpu_times()
    res = run_bench(setup)
    cpu = cpu_share(cpu0, cpu_times())
    if "mesh" not in res.records:
        raise RuntimeError(f"mesh run failed: {res.report['failed_targets']}")
    recs = res.records["mesh"][0]
    figures = res.report["runs"][0]["targets"]["mesh"]
    first = min(recs, key=lambda r: r.index)
    start_s = first.arrival_s - offsets[first.index]  # the harness's t0: arrival = t0 + offset
    out = summarize_run(recs, classes, start_s, slos)
    samples = figures["kv"].get("samples", [])
    out["preemptions"] = figures["kv"].get("preemptions")
    out["peak_running"] = max((s[3] for s in samples), default=None)
    out["peak_waiting"] = max((s[4] for s in samples), default=None)
    out["peak_kv_usage"] = figures["kv"].get("peak_usage")
    out["steps"] = figures.get("steps")
    out["mean_step_ms"] = 1e3 * figures["mean_step_s"] if figures.get("mean_step_s") else None
    out["per_step_ms"] = figures.get("per_step_ms")
    out["startup_s"] = figures.get("startup_s")
    out["cpu_share"] = cpu  # of the whole machine, from mesh start to stop (steal: other VMs)
    out["timeline_columns"] = ["t_s", "num_running", "num_waiting"]
    out["timeline"] = timeline(samples)
    out["headline"] = headline(out)
    out["requests_columns"] = ["arrival_s", "class", "ttft_ms", "tpot_ms", "e2e_ms",
                               "output_tokens", "status"]
    out["requests"] = [[round(r.arrival_s - start_s, 3), classes[r.index],
                        None if r.ttft_s is None else round(1e3 * r.ttft_s, 1),
                        None if r.tpot_s is None else round(1e3 * r.tpot_s, 2),
                        None if r.e2e_s is None else round(1e3 * r.e2e_s, 1),
                        r.num_output_tokens, r.status] for r in sorted(recs, key=lambda r: r.index)]
    kit.log(f"[priorities] {'on' if cfg.admission.priorities else 'off'}: " + ", ".join(
        f"{label} {_fmt(fmt, out['headline'][key])}" for label, key, fmt, _ in ROWS)
        + f", peak waiting {out['peak_waiting']}, statuses {out['status_counts']}")
    return out


def cpu_times() -> list[int] | None:
    """The machine's cumulative CPU ticks (/proc/stat: user nice system idle iowait irq
    softirq steal), or None where there is no /proc/stat."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None


def cpu_share(before, after) -> dict | None:
    """Shares of CPU time between two cpu_times() readings: busy, idle, steal."""
    if not before or not after:
        return None
    d = [a - b for a, b in zip(after, before)]
    total = sum(d) or 1
    return {"busy": (d[0] + d[1] + d[2] + d[5] + d[6]) / total, "idle": (d[3] + d[4]) / total,
            "steal": d[7] / total}


def timeline(samples: list[list], every_s: float = 1.0) -> list[list]:
    """The scheduler samples ([t_s, usage, waste, running, waiting]) thinned to one per
    `every_s`: [t_s, running, waiting]."""
    out, next_t = [], None
    for s in samples:
        if next_t is None or s[0] >= next_t:
            out.append([round(s[0], 1), s[3], s[4]])
            next_t = s[0] + every_s
    return out


def options(p) -> None:
    p.add_argument("--rate", type=float, default=1.0,
                   help="base Poisson rate, requests/s (10x during the burst)")
    p.add_argument("--duration", type=float, default=50.0, help="seconds of arrivals per run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interactive-share", type=float, default=0.3)
    p.add_argument("--slo-interactive", default="ttft_ms=1000,tpot_ms=200",
                   help="KEY=VALUE,... with keys ttft_ms, tpot_ms, e2e_ms")
    p.add_argument("--slo-batch", default="",
                   help="as --slo-interactive; empty: completing is enough")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--num-kv-blocks", type=int, default=4096)
    p.add_argument("--drain-timeout", type=float, default=240.0,
                   help="seconds after the last arrival before stragglers are cancelled (TIMEOUT)")


def run(args) -> dict:
    from llmesh.benchmarks.arrivals import ArrivalSpec, schedule
    from llmesh.benchmarks.harness import RunSpec
    from llmesh.mesh.config import EngineLimits
    from llmesh.services.executor.model_config import load_model_config
    if args.rounds < 1 or args.rate <= 0 or args.duration <= 0:
        raise ValueError("--rounds, --rate and --duration must be positive")
    slos = {"interactive": parse_slo(args.slo_interactive), "batch": parse_slo(args.slo_batch)}
    mc = load_model_config(args.model)
    limits = EngineLimits(num_kv_blocks=args.num_kv_blocks,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          max_num_seqs=args.max_num_seqs)
    context = min(mc.max_position_embeddings, limits.num_kv_blocks * limits.block_size)
    workload = classed(mc.vocab_size, context, args.seed, args.interactive_share, mc.bos_token_id)
    spec = RunSpec(ArrivalSpec("poisson", rate=args.rate), duration_s=args.duration)
    # the harness's schedule for run 0: the same arrivals in every run of both meshes
    offsets = schedule(spec.arrivals, None, args.duration, f"{args.seed}/0", workload.burst)
    classes = [r.priority for r in workload.take(len(offsets))]
    kit.log(f"[priorities] {len(offsets)} requests per run ({classes.count('interactive')} "
            f"interactive, {classes.count('batch')} batch), poisson {args.rate:g}/s, 10x from "
            f"{BURST['start_frac'] * args.duration:g} s to {BURST['end_frac'] * args.duration:g} s, "
            f"model {args.model}")
    report = {"kind": "llmesh-bench-priorities", "model": dataclasses.asdict(mc),
              "workload": workload.meta, "arrivals": spec.to_dict(),
              "num_requests": len(offsets), "num_interactive": classes.count("interactive"),
              "num_batch": classes.count("batch"), "slo": slos,
              "limits": dataclasses.asdict(limits),
              "mesh": {m: mesh_config(limits, m == "on").to_dict() for m in MODES},
              "loadavg_start": os.getloadavg()}
    t0 = time.perf_counter()

    def once(mode: str) -> dict:
        kit.log(f"[priorities] priorities {mode} ...")
        return run_once(args.model, workload, classes, offsets,
                        mesh_config(limits, mode == "on"), spec, args, slos)
    runs = kit.alternate(args.rounds, list(MODES), once)
    for mode_runs in runs.values():
        for round_, run_ in enumerate(mode_runs):
            run_["round"] = round_
    return {**report, "runs": runs, "summary": summarize_rounds(runs),
            "wall_s": time.perf_counter() - t0, "loadavg_end": os.getloadavg()}


SPEC = kit.Spec("priorities", __doc__, options, run, model="bench", json=DEFAULT_JSON,
                table=lambda r: markdown(r["summary"]) + "\n\n" + markdown_rounds(r["runs"]))

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
