"""The serving benchmark against the real mesh (Envoy + every service as processes):
every workload and arrival process through gRPC streams, and `llmesh bench online`
bringing its own mesh up for a rate sweep with goodput, side by side with the engine."""
import json

import pytest

from llmesh.benchmarks import workload as wl
from llmesh.benchmarks.arrivals import ArrivalSpec
from llmesh.benchmarks.harness import RunSpec, run_bench
from mesh_fixture import Mesh, serving
from llmesh.services.executor.model_config import load_model_config
from bench_checks import check_consistent, is_png, setup_for


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    # tracing off: with it on, `llmesh down` after cancelled streams waits ~7 s on services
    # retrying to export spans to the collector that already stopped
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("bench-mesh"),
             observability={"tracing": "off"})
    yield from serving(m)


def _attached(mesh, model_dir, workload, runs):
    schedulers = [f"127.0.0.1:{r['scheduler']}" for r in mesh.config["replica_ports"]]
    return setup_for(model_dir, workload, runs, targets=("mesh",), mesh_endpoint=mesh.endpoint,
                     mesh_schedulers=schedulers)


@pytest.mark.parametrize("name,runs", [
    ("chat", [RunSpec(ArrivalSpec("offline"), num_requests=8),
              RunSpec(ArrivalSpec("concurrency", concurrency=3), num_requests=7)]),
    ("shared-prefix", [RunSpec(ArrivalSpec("poisson", rate=60.0), num_requests=8)]),
    ("bursty", [RunSpec(ArrivalSpec("gamma", rate=60.0, burstiness=0.5), num_requests=8)]),
    ("long-context", [RunSpec(ArrivalSpec("offline"), num_requests=2)]),
])
def test_every_workload_and_arrival_through_envoy(mesh, tiny_model_dir, name, runs):
    mc = load_model_config(tiny_model_dir)
    w = wl.builtin(name, mc.vocab_size, 2048, seed=5, max_prompt=192, max_output=16)
    setup = _attached(mesh, tiny_model_dir, w, runs)
    result = run_bench(setup)
    check_consistent(result, setup)
    for run in result.report["runs"]:
        fig = run["targets"]["mesh"]
        assert fig["steps"] > 0 and fig["kv"]["num_blocks"] == 512
        assert fig["kv"]["preemptions"] == 0
        assert fig["per_step_ms"]["executor_rpc_s"] > 0
        # the mesh hands back every block once the run is over
        assert fig["kv"]["samples"][-1][1] == 0.0


def test_jsonl_workload_file_through_the_mesh(mesh, tiny_model_dir, tmp_path):
    mc = load_model_config(tiny_model_dir)
    path = wl.write_jsonl(tmp_path / "chat.jsonl",
                          wl.builtin("chat", mc.vocab_size, 2048, seed=9, max_prompt=64,
                                     max_output=8), 5)
    w = wl.load(str(path), mc.vocab_size, 2048)
    setup = _attached(mesh, tiny_model_dir, w, [RunSpec(ArrivalSpec("poisson", rate=50.0),
                                                        num_requests=10)])
    result = run_bench(setup)
    check_consistent(result, setup)
    recs = result.records["mesh"][0]
    assert [r.prompt_tokens for r in recs[:5]] == [r.prompt_tokens for r in recs[5:]]  # cycled


def test_llmesh_bench_online_rate_sweep_with_its_own_mesh(tiny_model_dir, tmp_path, capsys):
    from llmesh.mesh.cli import main
    out = tmp_path / "sweep.json"
    config = tmp_path / "mesh.yaml"  # fixed ports here must not matter: the bench picks free ones
    config.write_text(f"model: {tiny_model_dir}\nenvoy: {{port: 8080, admin_port: 9901}}\n"
                      "engine: {num_kv_blocks: 300, max_num_batched_tokens: 256}\n")
    rc = main(["bench", "online", "--config", str(config), "--targets", "engine,mesh",
               "--workload", "chat", "--rates", "40,120", "--num-requests", "10",
               "--max-prompt", "96", "--max-output", "12", "--slo", "ttft_ms=2000,tpot_ms=500",
               "--sample-interval", "0.02", "--drain-timeout", "60", "--json", str(out),
               "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert not report["failed_targets"] and report["baseline"] == "engine"
    assert [r["arrivals"]["rate"] for r in report["runs"]] == [40.0, 120.0]
    for run in report["runs"]:
        engine, mesh_fig = run["targets"]["engine"], run["targets"]["mesh"]
        # the same requests went to both targets
        assert [row[3:5] for row in engine["requests"]] == [row[3:5] for row in mesh_fig["requests"]]
        assert engine["output_tokens"] == mesh_fig["output_tokens"]
        for fig in (engine, mesh_fig):
            assert fig["status_counts"] == {"OK": 10}
            assert 0 <= fig["goodput"]["num_met"] <= 10
            assert fig["ttft_ms"]["p50"] <= fig["ttft_ms"]["p90"] <= fig["ttft_ms"]["p99"]
            assert fig["kv"]["samples"] and fig["roofline"]["bound_step_ms"] > 0
        assert engine["vs_baseline"]["output_tokens_per_s"] == pytest.approx(1.0)
        assert mesh_fig["vs_baseline"]["output_tokens_per_s"] > 0
    assert report["config"]["mesh"]["engine"]["num_kv_blocks"] == 300
    assert report["config"]["engine"]["num_kv_blocks"] == 300  # the engine got the mesh's limits
    assert report["config"]["mesh"]["envoy"]["port"] == 0
    assert all(run["targets"][t]["kv"]["num_blocks"] == 300
               for run in report["runs"] for t in ("engine", "mesh"))
    plots = tmp_path / "sweep-plots"
    for name in ("ttft_cdf", "itl_cdf", "throughput_vs_rate", "p99_ttft_vs_rate",
                 "goodput_vs_rate", "kv_usage"):
        assert is_png(plots / f"{name}.png"), name
    md = (tmp_path / "sweep.md").read_text()
    assert "| mesh |" in md and "Roofline:" in md and "## Sweep" in md
    assert "| mesh |" in capsys.readouterr().out


def test_refused_and_timed_out_requests_through_the_mesh(mesh, tiny_model_dir, tmp_path):
    import grpc

    from llmesh.v1 import scheduler_pb2, scheduler_pb2_grpc
    from mesh_fixture import wait_until
    good = {"prompt_token_ids": [0, 11, 12, 13], "max_tokens": 4}
    lines = [good, {"prompt_token_ids": [0] + [9] * 2100, "max_tokens": 4}, good]  # over 2048
    (tmp_path / "w.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    mc = load_model_config(tiny_model_dir)
    w = wl.load(str(tmp_path / "w.jsonl"), mc.vocab_size, 2048)
    result = run_bench(_attached(mesh, tiny_model_dir, w,
                                 [RunSpec(ArrivalSpec("offline"), num_requests=3)]))
    fig = result.report["runs"][0]["targets"]["mesh"]
    assert fig["status_counts"] == {"INVALID_ARGUMENT": 1, "OK": 2}
    assert fig["output_tokens"] == 8 and fig["ttft_ms"]["count"] == 2

    # streams still running when the drain timeout passes are cancelled: the mesh frees them
    (tmp_path / "slow.jsonl").write_text(json.dumps({"prompt_token_ids": [0, 11, 12],
                                                     "max_tokens": 1900}) + "\n")
    setup = _attached(mesh, tiny_model_dir, wl.load(str(tmp_path / "slow.jsonl"), mc.vocab_size,
                                                    2048),
                      [RunSpec(ArrivalSpec("offline"), num_requests=2)])
    setup.drain_timeout_s = 0.3
    fig = run_bench(setup).report["runs"][0]["targets"]["mesh"]
    assert fig["status_counts"] == {"TIMEOUT": 2}
    port = mesh.config["replica_ports"][0]["scheduler"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = scheduler_pb2_grpc.SchedulerStub(ch)
        assert wait_until(lambda: stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
                          .num_used_blocks == 0, 10)


def test_the_openai_target_drives_the_http_api_like_grpc(mesh, tiny_model_dir):
    """`--targets mesh,openai`: the same workload through gRPC and through the
    OpenAI-compatible HTTP API of one mesh; every token counted on both."""
    mc = load_model_config(tiny_model_dir)
    # (outputs long enough that the KV sampler, every 20 ms, sees blocks in use)
    w = wl.builtin("chat", mc.vocab_size, 2048, seed=3, max_prompt=96, max_output=48)
    schedulers = [f"127.0.0.1:{r['scheduler']}" for r in mesh.config["replica_ports"]]
    setup = setup_for(tiny_model_dir, w, [RunSpec(ArrivalSpec("concurrency", concurrency=4),
                                                  num_requests=8)],
                      targets=("mesh", "openai"), mesh_endpoint=mesh.endpoint,
                      mesh_schedulers=schedulers)
    result = run_bench(setup)
    check_consistent(result, setup)
    figs = result.report["runs"][0]["targets"]
    assert figs["openai"]["output_tokens"] == figs["mesh"]["output_tokens"]
    assert figs["openai"]["kv"]["num_blocks"] == 512  # our mesh: its schedulers' figures too
