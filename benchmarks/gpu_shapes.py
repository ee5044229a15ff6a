"""The model shapes `llmesh bench gpu` measures, and random checkpoints of them.

A checkpoint is a real Hugging Face Llama directory (config.json written by
transformers' LlamaConfig, safetensors weights, sharded with an index when
large) whose tensor names and shapes are read off a `LlamaForCausalLM` built on
the meta device, so transformers and llmesh load exactly the same weights.
Every tensor is drawn in place on the target device (seeded normal for the
matrices, ones for the RMSNorm weights), already in the serving dtype: an
8B-parameter checkpoint takes seconds on a GPU, with nothing downloaded and no
default initialisation. No tokenizer: the benchmark's prompts are token ids.

Torch and transformers are imported inside the functions (the CLI parser
imports this module).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shape:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    rope_scaling: dict | None  # llama3 frequency scaling, as the real checkpoints have it
    max_position_embeddings: int
    init_std: float  # the matrices' random normal; RMSNorm weights are ones
    bos_token_id: int | None
    eos_token_id: int | None
    # the end-to-end workload for this shape
    requests: int
    prompt_tokens: int
    output_tokens: int
    like: str  # the real model whose shape this is


def _llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


SHAPES = {
    "llama-1b": Shape("llama-1b", num_layers=16, hidden_size=2048, intermediate_size=8192,
                      num_heads=32, num_kv_heads=8, head_dim=64, vocab_size=128256,
                      tie_word_embeddings=True, rope_theta=500000.0,
                      rope_scaling=_llama3_rope(32.0), max_position_embeddings=131072,
                      init_std=0.02, bos_token_id=128000, eos_token_id=128001,
                      requests=256, prompt_tokens=256, output_tokens=128,
                      like="meta-llama/Llama-3.2-1B"),
    "llama-8b": Shape("llama-8b", num_layers=32, hidden_size=4096, intermediate_size=14336,
                      num_heads=32, num_kv_heads=8, head_dim=128, vocab_size=128256,
                      tie_word_embeddings=False, rope_theta=500000.0,
                      rope_scaling=_llama3_rope(8.0), max_position_embeddings=131072,
                      init_std=0.02, bos_token_id=128000, eos_token_id=128001,
                      requests=128, prompt_tokens=256, output_tokens=64,
                      like="meta-llama/Llama-3.1-8B"),
    # CPU tests of the same code path; untied, so the roofline's embedding rule is exercised.
    # A wide init keeps greedy choices clear of near-ties (as tests/hf_models.py does).
    "tiny-llama": Shape("tiny-llama", num_layers=2, hidden_size=64, intermediate_size=128,
                        num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=512,
                        tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=None,
                        max_position_embeddings=2048, init_std=0.15, bos_token_id=1,
                        eos_token_id=None, requests=8, prompt_tokens=32, output_tokens=8,
                        like="a test shape"),
}

SHARD_BYTES = 2 * 2**30


def param_counts(shape: Shape) -> dict:
    """Parameters from the shape alone: all of them, and those a decode step reads
    (all but an untied input embedding, of which a step reads only its batch's rows)."""
    h, q, kv = shape.hidden_size, shape.num_heads * shape.head_dim, \
        shape.num_kv_heads * shape.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * shape.intermediate_size + 2 * h
    embed = shape.vocab_size * h
    total = embed + shape.num_layers * per_layer + h + (0 if shape.tie_word_embeddings else embed)
    return {"num_params": total,
            "decode_params": total - (0 if shape.tie_word_embeddings else embed)}


def hf_config(shape: Shape, dtype: str = "bfloat16"):
    from transformers import LlamaConfig
    rope = {"rope_type": "default", "rope_theta": shape.rope_theta}
    if shape.rope_scaling:
        rope = {**shape.rope_scaling, "rope_theta": shape.rope_theta}
    config = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-5, rope_parameters=rope, tie_word_embeddings=shape.tie_word_embeddings,
        initializer_range=shape.init_std, bos_token_id=shape.bos_token_id,
        eos_token_id=shape.eos_token_id, pad_token_id=None, attention_bias=False,
        mlp_bias=False, hidden_act="silu")
    config.dtype = dtype
    return config


def checkpoint_tensors(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor `LlamaForCausalLM` saves for this shape, read off a
    model built on the meta device (a tied lm_head is not saved)."""
    import torch
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config(shape))
    out = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    if shape.tie_word_embeddings:
        out = [(n, s) for n, s in out if n != "lm_head.weight"]
    return out


def make_checkpoint(shape: Shape, out_dir: str | Path, device: str = "cpu",
                    dtype: str = "bfloat16", seed: int = 0) -> dict:
    """Write a random checkpoint of `shape` to `out_dir`; returns what was written."""
    import torch
    from safetensors.torch import save_file

    from llmesh.services.executor.weights import DTYPES
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype]
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    elem = torch.tensor([], dtype=torch_dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]  # planned first: files are named "of N"
    shard_bytes = total_bytes = num_params = 0
    for name, dims in checkpoint_tensors(shape):
        n = math.prod(dims)
        if shard_bytes and shard_bytes + n * elem > SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, dims))
        shard_bytes += n * elem
        total_bytes += n * elem
        num_params += n
    weight_map = {}
    for i, names in enumerate(shards):  # one shard in memory at a time
        tensors = {}
        for name, dims in names:
            t = torch.empty(dims, dtype=torch_dtype, device=dev)
            if len(dims) == 1:
                t.fill_(1.0)  # RMSNorm weights
            else:
                t.normal_(0.0, shape.init_std, generator=gen)
            tensors[name] = t.cpu()
        fname = "model.safetensors" if len(shards) == 1 else \
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name, _ in names})
        del tensors
    if len(shards) > 1:
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=1))
    hf_config(shape, dtype).save_pretrained(out_dir)
    return {"dir": str(out_dir), "num_params": num_params, "bytes": total_bytes,
            "dtype": dtype, "num_files": len(shards), "seed": seed, "device": str(dev),
            "make_s": time.perf_counter() - t0}
