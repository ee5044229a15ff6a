"""The Hugging Face baselines plug into the same harness: static batches and transformers'
continuous batching, served the same workload as the engine in one run."""
from llmesh.benchmarks import workload as wl
from llmesh.benchmarks.arrivals import ArrivalSpec
from llmesh.benchmarks.harness import RunSpec, run_bench
from llmesh.services.executor.model_config import load_model_config
from bench_checks import check_consistent, setup_for


def test_hf_static_and_hf_cb_side_by_side_with_the_engine(tiny_model_dir):
    mc = load_model_config(tiny_model_dir)
    w = wl.builtin("chat", mc.vocab_size, 2048, seed=2, max_prompt=96, max_output=12)
    runs = [RunSpec(ArrivalSpec("offline"), num_requests=6),
            RunSpec(ArrivalSpec("poisson", rate=60.0), num_requests=5)]
    setup = setup_for(tiny_model_dir, w, runs, targets=("engine", "hf-static", "hf-cb"),
                      hf_batch_size=4, max_output=12)
    result = run_bench(setup)
    check_consistent(result, setup)
    offline = result.report["runs"][0]["targets"]
    static = offline["hf-static"]
    # batches of at most 4 in arrival order, each padded to its longest prompt and output
    reqs = w.take(6)
    assert [i for b in static["batches"] for i in b] == list(range(6))
    assert all(len(b) <= 4 for b in static["batches"])
    held = allocated = steps = 0
    for batch in ([reqs[i] for i in b] for b in static["batches"]):
        held += sum(len(r.prompt_token_ids) + r.max_tokens for r in batch)
        allocated += len(batch) * (max(len(r.prompt_token_ids) for r in batch)
                                   + max(r.max_tokens for r in batch))
        steps += max(r.max_tokens for r in batch)  # one forward per token, the first the prefill
    assert static["kv"]["slot_utilisation"] == held / allocated < 1
    assert static["steps"] == steps
    assert offline["hf-cb"]["vs_baseline"]["output_tokens_per_s"] > 0
    assert set(offline) == {"engine", "hf-static", "hf-cb"}
