"""The tracing A/B benchmark end to end on the tiny model: two meshes up at once,
the idle one frozen, one pair of segments; every process it started is gone after."""
import json
import subprocess

from llmesh.benchmarks import tracing_overhead


def _mesh_processes() -> set[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return {line for line in out.splitlines() if "llmesh-tracing-" in line}


def test_one_pair_on_the_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "tracing.json"
    assert tracing_overhead.main(["--model", str(tiny_model_dir), "--requests", "3", "--pairs", "1",
                                  "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (pair,) = data["pairs"]
    for mode in ("on", "off"):
        seg = pair[mode]
        assert seg["output_tokens"] > 0 and seg["steps"] > 0 and seg["forward_s_ms_per_step"] > 0
        assert seg["cpu_s"]["executor-0-0"] > 0
    # only the traced mesh has a collector, and it received the segment's spans
    assert "collector" in pair["on"]["cpu_s"] and "collector" not in pair["off"]["cpu_s"]
    summary = data["summary"]
    assert summary["spans_exported"] > 0
    assert summary["median_on_over_off"] == pair["ratio"]
    assert pair["on"]["output_tokens"] == pair["off"]["output_tokens"]  # the same requests
    assert not _mesh_processes()
