"""One tensor-parallel rank for the TP tests: loads each model's shard, computes
teacher-forced logits and greedy / seeded generations, writes them as JSON.

    python tests/tp_worker.py --rank R --world-size W --dist-addr HOST:PORT --out F DIR...

Every rank runs the same Engine (its scheduler is deterministic, so every rank
executes the same plans); rank 0 samples and broadcasts, as in the mesh.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmesh.services.common.sampling_params import SamplingParams  # noqa: E402
from llmesh.services.engine.engine import Engine, EngineConfig  # noqa: E402
from llmesh.services.executor.attention import SeqSlice, TorchPagedAttention, build_metadata  # noqa: E402
from llmesh.services.executor.weights import load_model  # noqa: E402


def weight_bytes(model) -> int:
    """Bytes of distinct parameter storage this process holds (tied weights once)."""
    seen, total = set(), 0
    for p in model.parameters():
        key = p.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += p.untyped_storage().nbytes()
    return total


def teacher_forced_logits(model, token_ids: list[int], chunk: int) -> torch.Tensor:
    block_size = 4
    attn = model.model.layers[0].self_attn
    num_blocks = len(token_ids) // block_size + 2
    shape = (num_blocks, block_size, attn.num_kv_heads, model.config.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(model.config.num_layers)]
    block_ids = list(range(num_blocks - 1, -1, -1))
    out = []
    for start in range(0, len(token_ids), chunk):
        ids = token_ids[start:start + chunk]
        meta = build_metadata([SeqSlice(start, len(ids), block_ids)], block_size,
                              model.config.sliding_window, torch.device("cpu"))
        hidden = model(torch.tensor(ids), torch.arange(start, start + len(ids)), caches, meta,
                       TorchPagedAttention())
        out.append(model.compute_logits(hidden))
    return torch.cat(out)


def run_model(model_dir: str, group) -> dict:
    model = load_model(model_dir, "float32", "cpu", group)
    vocab = model.config.vocab_size
    rng = random.Random(7)
    prompts = [[1] + [rng.randrange(2, vocab) for _ in range(n)] for n in (5, 37, 70, 3, 19, 50)]
    with torch.inference_mode():
        logits = teacher_forced_logits(model, prompts[2], chunk=24)
    engine = Engine(model, EngineConfig(num_kv_blocks=64, max_num_batched_tokens=48,
                                        max_num_seqs=8))
    greedy = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0,
                                                     ignore_eos=True))
    seeded = engine.generate(prompts[:3], SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9,
                                                         seed=11, n=2, ignore_eos=True))
    structured = None
    if (Path(model_dir) / "tokenizer.json").is_file():  # structured output: grammar on rank 0
        from llmesh.services.common.grammar_spec import GrammarSpec
        from llmesh.services.common.tokenizer import TextTokenizer
        with_text = Engine(model, EngineConfig(num_kv_blocks=64, max_num_batched_tokens=48,
                                               max_num_seqs=8), TextTokenizer(model_dir))
        structured = [[c.token_ids for c in cs] for cs in with_text.generate(
            prompts[:2], SamplingParams(max_tokens=30, temperature=0.9, seed=5, n=2,
                                        grammar=GrammarSpec("regex", r"(yes|no|maybe)[0-9]{3}")))]
    # int8 weights under tensor parallelism (row-parallel layers quantize their slice)
    int8 = load_model(model_dir, "int8", "cpu", group)
    with torch.inference_mode():
        int8_logits = teacher_forced_logits(int8, prompts[2], chunk=24)
    int8_greedy = Engine(int8, EngineConfig(num_kv_blocks=64, max_num_batched_tokens=48,
                                            max_num_seqs=8)).generate(
        prompts[:2], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    return {
        "int8_logits": int8_logits.tolist() if int8_logits.shape[-1] else None,
        "int8_greedy": [[c.token_ids for c in cs] for cs in int8_greedy],
        "structured": structured,
        "logits": logits.tolist() if logits.shape[-1] else None,
        "greedy": [[c.token_ids for c in cs] for cs in greedy],
        "seeded": [[c.token_ids for c in cs] for cs in seeded],
        "weight_bytes": weight_bytes(model),
        "kv_heads_per_rank": model.model.layers[0].self_attn.num_kv_heads,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--dist-addr", default="")
    p.add_argument("--out", required=True)
    p.add_argument("models", nargs="+")
    args = p.parse_args()
    torch.set_num_threads(1)
    group = None
    if args.world_size > 1:
        from llmesh.services.executor.parallel import init_group
        group = init_group(args.rank, args.world_size, args.dist_addr, timeout_s=60)
    try:
        results = {m: run_model(m, group) for m in args.models}
        Path(args.out).write_text(json.dumps(results))
    finally:
        if group is not None:
            group.close()


if __name__ == "__main__":
    main()
