"""`llmesh bench gpu` end to end on the CPU: the tiny Llama shape through the same code
a GPU runs (random checkpoint, decode steps against the roofline, the profile split,
the engine against transformers' static batches and generate_batch), checked for
complete sections, greedy parity with transformers and the roofline's arithmetic."""
import contextlib
import io
import json
import math

import pytest

from llmesh.benchmarks import gpu_decode, gpu_shapes
from llmesh.mesh.cli import main
from llmesh.services.executor.model_config import parse_model_config

REQUESTS, PROMPT, OUTPUT, BATCHES, STEPS = 6, 24, 8, (1, 4), 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-gpu")
    out, ckpt = tmp / "tiny.json", tmp / "ckpt"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["bench", "gpu", "--shape", "tiny-llama", "--device", "cpu",
                   "--dtype", "float32", "--requests", str(REQUESTS),
                   "--prompt-tokens", str(PROMPT), "--output-tokens", str(OUTPUT),
                   "--batches", ",".join(map(str, BATCHES)), "--decode-steps", str(STEPS),
                   "--hf-batch-size", "4", "--checkpoint-dir", str(ckpt),
                   "--json", str(out), "--no-progress"])
    return rc, json.loads(out.read_text()), stdout.getvalue(), ckpt


def test_every_section_is_there_with_positive_numbers(run):
    rc, report, table, _ = run
    assert rc == 0 and report["errors"] == {}
    for key in ("shape", "workload", "checkpoint", "model", "bandwidth", "end_to_end",
                "engine_config", "decode", "profile", "machine", "versions", "timings_s"):
        assert report[key] is not None, key
    assert report["machine"]["num_cpus"] > 0 and report["versions"]["torch"]
    e2e = report["end_to_end"]
    assert set(e2e["targets"]) == {"engine", "hf-static", "hf-cb"}
    for name, fig in e2e["targets"].items():
        assert fig["num_ok"] == fig["num_requests"] == REQUESTS, name
        assert fig["output_tokens"] == REQUESTS * OUTPUT, name
        assert fig["output_tokens_per_s"] > 0 and fig["duration_s"] > 0, name
    assert set(e2e["ratios"]) == {"engine/hf-static", "engine/hf-cb"}
    assert all(r > 0 for r in e2e["ratios"].values())
    rows = report["decode"]["rows"]
    assert [r["batch"] for r in rows] == list(BATCHES)
    assert {r["mode"] for r in rows} == {"eager"}  # (no CUDA graphs on a CPU)
    for r in rows:
        assert r["steps"] == STEPS
        for key in ("step_ms", "gpu_ms", "forward_ms", "roofline_ms", "share", "tokens_per_s"):
            assert r[key] > 0, key
    prof = report["profile"]
    assert prof["batch"] == max(BATCHES)  # 64 is not measured here: the largest batch
    assert prof["wall_ms"] > 0 and prof["gpu_event_ms"] > 0 and prof["gpu_event_over_wall"] > 0
    assert "profiler_error" not in prof and prof["top_host_ops_ms"]
    assert all(t >= 0 for t in report["timings_s"].values())
    # the table printed
    assert "| target | output tok/s |" in table and "| mode | batch | step |" in table
    assert f"Profile (eager) at batch {max(BATCHES)}" in table


def test_the_engine_gives_transformers_greedy_tokens(run):
    agreement = run[1]["end_to_end"]["token_agreement"]
    for name in ("hf-static", "hf-cb"):
        assert agreement[name]["compared"] == REQUESTS
        assert agreement[name]["identical"] >= REQUESTS - 1, (name, agreement[name])
        # (empty token lists would agree too: they share no prefix)
        assert agreement[name]["mean_common_prefix_fraction"] >= (REQUESTS - 1) / REQUESTS


def test_roofline_arithmetic(run):
    _, report, _, ckpt = run
    cfg = json.loads((ckpt / "config.json").read_text())
    h, layers, inter, vocab = (cfg["hidden_size"], cfg["num_hidden_layers"],
                               cfg["intermediate_size"], cfg["vocab_size"])
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h  # attention, MLP, 2 norms
    embed = vocab * h
    tied = cfg["tie_word_embeddings"]
    total = embed + layers * per_layer + h + (0 if tied else embed)
    read = total - (0 if tied else embed)  # a decode step reads B rows of the input embedding
    assert report["checkpoint"]["num_params"] == report["model"]["num_params"] == total
    assert report["decode"]["weight_bytes"] == 4 * read and report["model"]["bytes"] == 4 * total
    kv_per_token = 2 * layers * kv * 4  # K and V, every layer, float32
    assert report["decode"]["kv_bytes_per_token"] == kv_per_token
    bw = report["bandwidth"]["bytes_per_s"]
    assert bw == report["bandwidth"]["measured_copy_bytes_per_s"] > 0  # a CPU: measured
    warm = report["decode"]["warmup_steps"]
    for r in report["decode"]["rows"]:
        # timed step k computes position PROMPT + warm + k and reads that many + 1 tokens
        context = PROMPT + warm + (STEPS + 1) / 2
        assert r["context_tokens"] == pytest.approx(context)
        assert r["kv_bytes"] == pytest.approx(r["batch"] * context * kv_per_token)
        roofline_ms = 1e3 * (4 * read + r["batch"] * context * kv_per_token) / bw
        assert r["roofline_ms"] == pytest.approx(roofline_ms)
        assert r["share"] == pytest.approx(roofline_ms / r["step_ms"])


def test_the_real_shapes_are_the_models_they_name():
    for name, params, decode in (("llama-1b", 1_235_814_400, 1_235_814_400),
                                 ("llama-8b", 8_030_261_248, 7_504_924_672)):
        shape = gpu_shapes.SHAPES[name]
        tensors = gpu_shapes.checkpoint_tensors(shape)  # off a meta-device LlamaForCausalLM
        assert sum(math.prod(d) for _, d in tensors) == params
        assert gpu_shapes.param_counts(shape) == {"num_params": params, "decode_params": decode}
        assert ("lm_head.weight" in dict(tensors)) == (name == "llama-8b")
        mc = parse_model_config(gpu_shapes.hf_config(shape).to_dict())  # llmesh reads it
        assert (mc.num_layers, mc.hidden_size, mc.num_heads, mc.num_kv_heads, mc.head_dim,
                mc.vocab_size, mc.rope_theta) == (shape.num_layers, shape.hidden_size,
                                                  shape.num_heads, shape.num_kv_heads,
                                                  shape.head_dim, 128256, 500000.0)
        assert mc.tie_word_embeddings == shape.tie_word_embeddings
        assert mc.rope_scaling.factor == (32.0 if name == "llama-1b" else 8.0)  # llama3 rope


def test_peak_bandwidth_by_gpu_name():
    assert gpu_decode.spec_bandwidth("NVIDIA H100 80GB HBM3") == (3.35, "H100 spec sheet")
    assert gpu_decode.spec_bandwidth("NVIDIA H200")[0] == 4.8
    assert gpu_decode.spec_bandwidth("NVIDIA H100 PCIe")[0] == 2.0
    assert gpu_decode.spec_bandwidth("NVIDIA H100 NVL")[0] == 3.9
    assert gpu_decode.spec_bandwidth("NVIDIA A100-SXM4-80GB") is None
    assert gpu_decode.spec_bandwidth(None) is None


def test_bench_kernels_runs_on_a_gpu_and_says_it_needs_one_elsewhere(capsys):
    """`llmesh bench kernels` is registered: on a GPU a one-case grid runs and prints
    its table; without CUDA it exits 2 and says why (it ran on an H200: BENCHMARKS.md)."""
    import torch
    rc = main(["bench", "kernels", "--batches", "1", "--contexts", "64", "--head-dims", "64",
               "--reps", "2", "--prefill", ""])
    out = capsys.readouterr()
    if torch.cuda.is_available():
        assert rc == 0 and "| 64 | 1 | 64 |" in out.out
    else:
        assert rc == 2 and "needs a CUDA device" in out.err


def test_kernel_bench_table_from_a_report():
    from llmesh.benchmarks.gpu_kernels import markdown
    row = {"head_dim": 128, "batch": 64, "context": 4096, "kv_bytes": 1.07e9,
           "paged_s": 374.4e-6, "paged_host_s": 46e-6, "sdpa_s": 245.5e-6,
           "paged_share": 0.733, "sdpa_share": 1.117}
    table = markdown({"dtype": "bfloat16", "gpu": "NVIDIA H200", "kv_heads": 8, "group": 4,
                      "block_size": 16, "copy_bytes_per_s": 3.91e12, "rows": [row]})
    assert "| 128 | 64 | 4096 | 374.4 us | 73.3% | 46.0 us | 245.5 us | 111.7% |" in table
