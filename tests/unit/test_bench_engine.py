"""The serving benchmark against the in-process Engine: every workload under every
arrival process, small and fast; figures checked against what the clients received."""
import json

import pytest

from bench_checks import check_consistent, is_png, setup_for
from llmesh.benchmarks import workload as wl
from llmesh.benchmarks.arrivals import ArrivalSpec
from llmesh.benchmarks.harness import RunSpec, run_bench
from llmesh.benchmarks.metrics import parse_slo
from llmesh.benchmarks.report import markdown, write_outputs
from llmesh.services.executor.model_config import load_model_config

ARRIVALS = [RunSpec(ArrivalSpec("offline"), num_requests=8),
            RunSpec(ArrivalSpec("poisson", rate=80.0), num_requests=8),
            RunSpec(ArrivalSpec("gamma", rate=80.0, burstiness=0.5), num_requests=8),
            RunSpec(ArrivalSpec("concurrency", concurrency=3), num_requests=8)]



@pytest.mark.parametrize("name", wl.BUILTIN)
def test_every_builtin_workload_under_every_arrival_process(tiny_model_dir, name):
    mc = load_model_config(tiny_model_dir)
    w = wl.builtin(name, mc.vocab_size, mc.max_position_embeddings, seed=1, max_prompt=256,
                   max_output=24)
    runs = ARRIVALS if name != "long-context" else \
        [RunSpec(s.arrivals, num_requests=3) for s in ARRIVALS]
    setup = setup_for(tiny_model_dir, w, runs)
    result = run_bench(setup)
    check_consistent(result, setup)
    fig = result.report["runs"][0]["targets"]["engine"]
    assert fig["steps"] > 0 and fig["roofline"]["measured_step_ms"] > 0
    if name == "long-context":
        assert min(row[3] for row in fig["requests"]) > 0.8 * (2048 - 128)


def test_sharegpt_file_and_duration_bounded_runs(tiny_model_dir, tmp_path):
    convs = [{"conversations": [{"from": "human", "value": f"Tell me about the lighthouse {i} "
                                 "and the keeper who climbed the stairs."},
                                {"from": "gpt", "value": "The sea was grey and calm. " * (i + 1)}]}
             for i in range(6)]
    (tmp_path / "sg.json").write_text(json.dumps(convs))
    mc = load_model_config(tiny_model_dir)
    w = wl.load(str(tmp_path / "sg.json"), mc.vocab_size, 2048, model_dir=tiny_model_dir)
    runs = [RunSpec(ArrivalSpec("poisson", rate=40.0), duration_s=0.3),
            RunSpec(ArrivalSpec("concurrency", concurrency=2), duration_s=0.3)]
    setup = setup_for(tiny_model_dir, w, runs)
    result = run_bench(setup)
    check_consistent(result, setup)
    recs = result.records["engine"][0]
    assert len(recs) >= 2 and all(r.arrival_s - recs[0].arrival_s < 0.3 + 1e-6 for r in recs)
    conc = result.records["engine"][1]
    # at most 2 in flight at any time: a request is sent only when one of 2 workers is free
    events = sorted([(r.sent_s, 1) for r in conc] + [(r.done_s, -1) for r in conc])
    in_flight, peak = 0, 0
    for _, d in events:
        in_flight += d
        peak = max(peak, in_flight)
    assert peak <= 2


def test_sweep_with_slo_writes_json_markdown_and_plots(tiny_model_dir, tmp_path):
    mc = load_model_config(tiny_model_dir)
    w = wl.builtin("chat", mc.vocab_size, 2048, seed=0, max_prompt=128, max_output=16)
    runs = [RunSpec(ArrivalSpec("poisson", rate=r), num_requests=10) for r in (30.0, 90.0)]
    setup = setup_for(tiny_model_dir, w, runs, slo=parse_slo("ttft_ms=250,tpot_ms=100"),
                      baseline="engine")
    result = run_bench(setup, json_out=tmp_path / "out.json")
    check_consistent(result, setup)
    report = json.loads((tmp_path / "out.json").read_text())
    assert [r["arrivals"]["rate"] for r in report["runs"]] == [30.0, 90.0]
    for run in report["runs"]:
        fig = run["targets"]["engine"]
        g = fig["goodput"]
        assert 0 <= g["num_met"] <= fig["num_ok"] and g["fraction"] == g["num_met"] / 10
        assert fig["vs_baseline"]["output_tokens_per_s"] == pytest.approx(1.0)
    for key in ("machine", "versions", "model", "config", "memory_bandwidth", "workload"):
        assert report[key]
    assert report["model"]["bytes"] == 4 * report["model"]["num_params"]  # float32
    assert report["memory_bandwidth"]["bytes_per_s"] > 0
    written = write_outputs(report, None, tmp_path / "out.md", tmp_path / "plots")
    names = {p.name for p in written}
    assert {"out.md", "ttft_cdf.png", "itl_cdf.png", "throughput_vs_rate.png",
            "p99_ttft_vs_rate.png", "goodput_vs_rate.png", "kv_usage.png"} <= names
    assert all(is_png(p) for p in written if p.suffix == ".png")
    md = (tmp_path / "out.md").read_text()
    assert md == markdown(report)
    assert "Roofline:" in md and "## poisson 30/s" in md and "## Sweep" in md
    assert md.count("| engine |") == 2 + 2  # one row per run table, one per sweep point


def test_bench_offline_cli_keeps_its_figures(tiny_model_dir, tmp_path, capsys):
    from llmesh.mesh.cli import main
    out = tmp_path / "off.json"
    rc = main(["bench", "offline", "--model", str(tiny_model_dir), "--num-requests", "6",
               "--targets", "engine", "--max-prompt", "64", "--max-output", "12", "--json",
               str(out), "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    [run] = report["runs"]
    fig = run["targets"]["engine"]
    reqs = wl.offline_workload(6, load_model_config(tiny_model_dir).vocab_size, 0, 64, 12)
    assert fig["output_tokens"] == sum(r.max_tokens for r in reqs)
    assert fig["prompt_tokens"] == sum(len(r.prompt_token_ids) for r in reqs)
    assert fig["engine_speedup"] == pytest.approx(1.0) and fig["wall_s"] > 0
    assert (tmp_path / "off.md").is_file() and is_png(tmp_path / "off-plots" / "ttft_cdf.png")
    assert "| engine |" in capsys.readouterr().out
    from llmesh.benchmarks.report import main as report_main
    assert report_main([str(out)]) == 0
    assert capsys.readouterr().out == (tmp_path / "off.md").read_text()
    assert main(["bench", "workload", "shared-prefix", "--model", str(tiny_model_dir),
                 "--num-requests", "5", "--seed", "3", "--out", str(tmp_path / "w.jsonl")]) == 0
    w = wl.load(str(tmp_path / "w.jsonl"), 3072, 2048)
    assert w.meta["source_name"] == "shared-prefix" and w.meta["num_distinct_requests"] == 5
    assert [r.prompt_token_ids for r in w.take(5)] == \
        [r.prompt_token_ids for r in wl.builtin("shared-prefix", 3072, 2048, seed=3).take(5)]
    assert main(["bench", "online", "--model", str(tiny_model_dir), "--targets", "engine"]) == 2
    assert main(["bench", "online", "--model", str(tiny_model_dir), "--targets", "nope",
                 "--rate", "1", "--num-requests", "1"]) == 2


def test_refused_and_timed_out_requests_are_counted_by_status(tiny_model_dir, tmp_path):
    good = {"prompt_token_ids": [0, 11, 12, 13], "max_tokens": 4}
    lines = [good, {"prompt_token_ids": [0] + [9] * 2100, "max_tokens": 4}, good]  # over 2048
    (tmp_path / "w.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "slow.jsonl").write_text(json.dumps({"prompt_token_ids": [0, 11, 12],
                                                     "max_tokens": 2000}) + "\n")
    mc = load_model_config(tiny_model_dir)
    refused = run_bench(setup_for(tiny_model_dir, wl.load(str(tmp_path / "w.jsonl"),
                                                          mc.vocab_size, 2048),
                                  [RunSpec(ArrivalSpec("offline"), num_requests=3)]))
    fig = refused.report["runs"][0]["targets"]["engine"]
    assert fig["status_counts"] == {"INVALID_ARGUMENT": 1, "OK": 2}
    assert fig["num_ok"] == 2 and fig["ttft_ms"]["count"] == 2 and fig["output_tokens"] == 8
    assert "prompt" in refused.records["engine"][0][1].error

    # requests that cannot finish within the drain timeout are cancelled, counted as TIMEOUT
    # with the tokens they had received
    setup = setup_for(tiny_model_dir, wl.load(str(tmp_path / "slow.jsonl"), mc.vocab_size, 2048),
                      [RunSpec(ArrivalSpec("offline"), num_requests=2)])
    setup.drain_timeout_s = 0.3
    timed_out = run_bench(setup)
    fig = timed_out.report["runs"][0]["targets"]["engine"]
    assert fig["status_counts"] == {"TIMEOUT": 2} and fig["num_ok"] == 0
    recs = timed_out.records["engine"][0]
    assert fig["output_tokens"] == sum(r.num_output_tokens for r in recs) < 2 * 2000


def test_a_failing_target_is_reported_and_the_others_still_run(tiny_model_dir, tmp_path):
    from llmesh.mesh.ports import free_port
    mc = load_model_config(tiny_model_dir)
    w = wl.builtin("chat", mc.vocab_size, 2048, seed=0, max_prompt=64, max_output=8)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    setup = setup_for(tiny_model_dir, w, [RunSpec(ArrivalSpec("offline"), num_requests=3)],
                      targets=("mesh", "engine"), mesh_endpoint=dead, mesh_schedulers=[dead])
    result = run_bench(setup, json_out=tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["failed_targets"]) == ["mesh"] == list(result.report["failed_targets"])
    assert "UNAVAILABLE" in report["failed_targets"]["mesh"]
    assert report["runs"][0]["targets"]["engine"]["status_counts"] == {"OK": 3}
    assert "Failed targets: mesh" in markdown(report)
