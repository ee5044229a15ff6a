"""The GPU session's other tools on the CPU, as its dry run runs them: transformers'
static batching at several sizes, the mesh's replica against the engine, greedy
agreement with transformers, and the prefill rows of the kernel bench's table."""
import contextlib
import io
import json

from llmesh.benchmarks import gpu_agreement, gpu_kernels, gpu_mesh, kit
from llmesh.mesh.cli import main


def test_static_batching_at_several_sizes_compares_the_engine_with_the_fastest(tmp_path):
    out = tmp_path / "b.json"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["bench", "gpu", "--shape", "tiny-llama", "--device", "cpu", "--dtype",
                   "float32", "--requests", "4", "--prompt-tokens", "12", "--output-tokens", "4",
                   "--batches", "", "--targets", "engine,hf-static", "--hf-batch-size", "1,4",
                   "--json", str(out), "--no-progress"])
    report = json.loads(out.read_text())
    e2e = report["end_to_end"]
    assert rc == 0 and report["errors"] == {}
    assert set(e2e["targets"]) == {"engine", "hf-static-1", "hf-static-4"}
    assert e2e["targets"]["hf-static-4"]["label"].endswith("of 4")
    best = max(("hf-static-1", "hf-static-4"),
               key=lambda n: e2e["targets"][n]["output_tokens_per_s"])
    assert e2e["hf_static_best"] == best
    assert e2e["ratios"]["engine/hf-static"] == e2e["ratios"][f"engine/{best}"]
    assert all(a["identical"] == 4 for a in e2e["token_agreement"].values())


def test_a_mesh_replica_gives_the_engines_tokens(tmp_path):
    """Scheduler and executor processes (started and stopped by the benchmark) against
    the in-process engine: same greedy tokens, both measured."""
    result = gpu_mesh.run(kit.parser(gpu_mesh.SPEC).parse_args(
        ["--device", "cpu", "--shape", "tiny-llama", "--dtype", "float32", "--requests", "6",
         "--prompt-tokens", "10", "--output-tokens", "6", "--rounds", "1"]))
    assert result["identical_requests"] == result["requests"] == 6
    assert len(result["output_tokens_per_s"]["mesh"]) == 1
    assert result["mesh_median"] > 0 and result["engine_median"] > 0


def test_agreement_with_transformers_in_float32(tiny_model_dir):
    """On the tiny model transformers' cached `generate` leaves its own full forward at
    near-ties (margins of a few hundredths); wherever llmesh's answer differs, its token
    is the one transformers' full pass ranks first."""
    result = gpu_agreement.measure(tiny_model_dir, 3, 6, "cpu", ["float32"])
    row = result["float32"]["llmesh"]
    assert row["prompts"] == 3 and row["identical"] >= 1
    assert row["our_token_rank_there"] == [0] * (3 - row["identical"])
    assert all(m < 0.5 for m in row["margins_at_difference"])


def test_agreement_reports_the_margin_at_a_difference():
    import torch
    logits = torch.zeros(3, 5)
    logits[1, 2], logits[1, 4] = 3.0, 2.5  # at step 1 transformers' top-1 is 2, top-2 is 4
    row = gpu_agreement.compare([[1, 4, 0]], [[1, 2, 0]], [logits])
    assert row["identical"] == 0 and row["first_differences"] == [1]
    assert row["margins_at_difference"] == [0.5] and row["our_token_rank_there"] == [1]


def test_kernel_bench_prefill_table():
    report = {"prefill": {"heads": 32, "kv_heads": 8, "head_dim": 64, "matmul_tflops": 700.0,
                          "peak_tflops": 989.4, "rows": [
                              {"tokens": 8192, "chunks": 4, "cached_per_chunk": 2048,
                               "kernel_s": 1.5e-3, "kernel_tflops": 330.0,
                               "share_of_matmul": 330 / 700, "share_of_peak": 330 / 989.4,
                               "gather_sdpa_s": 4.2e-3, "max_abs_err": 0.0078}]}}
    table = gpu_kernels._prefill_markdown(report)
    assert "| 8192x4 | 2048 | 1.50 ms | 330 | 47% | 33% | 4.20 ms | 0.0078 |" in table
