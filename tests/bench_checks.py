"""Shared checks of the serving-benchmark tests (unit: engine, HF; integration: mesh)."""
import json
import struct

from llmesh.benchmarks.harness import BenchSetup
from llmesh.services.engine.engine import EngineConfig

SMALL = 16 * 2**20  # bandwidth probe buffer: enough to measure, quick on 2 cores


def setup_for(model_dir, workload, runs, targets=("engine",), **kw):
    kw.setdefault("engine_config", EngineConfig(num_kv_blocks=512, max_num_batched_tokens=512))
    return BenchSetup(model_dir=str(model_dir), workload=workload, target_names=list(targets),
                      runs=runs, bandwidth_bytes=SMALL, sample_interval_s=0.02,
                      drain_timeout_s=60, show_progress=False, log=lambda m: None, **kw)


def check_consistent(result, setup):
    """Token counts equal what the clients received (and what the server says it sent),
    latencies ordered, every request accounted for."""
    report = result.report
    assert not report["failed_targets"]
    for name, per_run in result.records.items():
        for run, recs, spec in zip(report["runs"], per_run, setup.runs):
            fig = run["targets"][name]
            expected = spec.num_requests if spec.num_requests is not None else len(recs)
            assert fig["num_requests"] == len(recs) == expected
            assert fig["status_counts"] == {"OK": len(recs)}, [r.error for r in recs]
            received = sum(sum(r.chunk_tokens) for r in recs)
            assert fig["output_tokens"] == received == sum(r.max_tokens for r in recs)
            assert [r.server_output_tokens for r in recs] == [r.max_tokens for r in recs]
            assert fig["prompt_tokens"] == sum(r.prompt_tokens for r in recs)
            assert [row[4] for row in fig["requests"]] == [r.max_tokens for r in recs]
            for key in ("ttft_ms", "e2e_ms", "itl_ms", "tpot_ms"):
                d = fig[key]
                if d["count"]:
                    assert 0 <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"]
            assert fig["ttft_ms"]["count"] == len(recs)
            for r in recs:
                assert r.arrival_s <= r.sent_s + 1e-3 and r.chunk_times[0] <= r.done_s
                assert r.chunk_times == sorted(r.chunk_times)
            if "kv" in fig and "samples" in fig["kv"]:
                assert fig["kv"]["samples"] and 0 < fig["kv"]["peak_usage"] <= 1
                assert all(0 <= s[1] <= 1 for s in fig["kv"]["samples"])
    json.loads(json.dumps(report))  # JSON-ready as it is


def is_png(path):
    data = path.read_bytes()
    if len(data) < 1000 or data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width > 100 and height > 100
