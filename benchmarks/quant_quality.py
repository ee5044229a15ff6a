"""What the CPU weight formats cost in quality, against float32, on checkpoints of
real architectures and shapes (random weights: nothing is downloaded).

For each shape a random checkpoint is made with transformers (its own
initialisation, saved as safetensors in a temporary directory), then:

- teacher-forced logits over prompt + the float32 model's greedy continuation:
  the largest |logit difference|, relative to the largest |logit|, and how often
  the arg max agrees;
- greedy generation of `--tokens` tokens per prompt: how many tokens agree with
  float32 before the first difference (mean), and how many prompts agree all
  the way.

Random weights give flatter logits than a trained model, with near-ties that
any rounding flips, so greedy agreement here is a pessimistic figure.
"""
from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llmesh.benchmarks import kit
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.engine.engine import Engine, EngineConfig
from llmesh.services.executor.attention import SeqSlice, TorchPagedAttention, build_metadata
from llmesh.services.executor.weights import load_model

# the published configurations' shapes
SHAPES = {
    "qwen2.5-0.5b": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "llama-3.2-1b": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rope_theta=5e5, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
}
FORMATS = ("float16-weights", "int8")


def make_checkpoint(shape: str, out: Path) -> Path:
    import transformers
    config_cls, model_cls, kw = SHAPES[shape]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kw)
    model = getattr(transformers, model_cls)(config)
    model.save_pretrained(out, safe_serialization=True)
    return out


@torch.inference_mode()
def teacher_forced_logits(model, token_ids: list[int]) -> torch.Tensor:
    block_size = 16
    attn = model.model.layers[0].self_attn
    num_blocks = -(-len(token_ids) // block_size)
    shape = (num_blocks, block_size, attn.num_kv_heads, model.config.head_dim)
    dtype = model.model.embed_tokens.weight.dtype
    caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
              for _ in range(model.config.num_layers)]
    meta = build_metadata([SeqSlice(0, len(token_ids), list(range(num_blocks)))], block_size,
                          model.config.sliding_window, torch.device("cpu"))
    hidden = model(torch.tensor(token_ids), torch.arange(len(token_ids)), caches, meta,
                   TorchPagedAttention())
    return model.compute_logits(hidden)


def greedy(model, prompts: list[list[int]], num_tokens: int) -> tuple[list[list[int]], float]:
    return engine_greedy(Engine(model, EngineConfig(num_kv_blocks=len(prompts) * (-(-(
        max(map(len, prompts)) + num_tokens) // 16)), max_num_seqs=len(prompts))),
        prompts, num_tokens)


def engine_greedy(engine: Engine, prompts: list[list[int]],
                  num_tokens: int) -> tuple[list[list[int]], float]:
    """`num_tokens` greedy tokens per prompt (EOS a token like any other) and the
    seconds they took; the engine is closed after."""
    t0 = time.perf_counter()
    out = engine.generate(prompts, SamplingParams(max_tokens=num_tokens, temperature=0.0,
                                                  ignore_eos=True))
    seconds = time.perf_counter() - t0
    engine.close()
    return [c[0].token_ids for c in out], seconds


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def measure(model_dir: Path, num_prompts: int, num_tokens: int) -> dict:
    ref = load_model(model_dir, "float32")
    vocab = ref.config.vocab_size
    rng = random.Random(1)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(16, 64))]
               for _ in range(num_prompts)]
    ref_out, ref_s = greedy(ref, prompts, num_tokens)
    sequences = [p + o for p, o in zip(prompts, ref_out)]
    ref_logits = [teacher_forced_logits(ref, s) for s in sequences]
    del ref
    result = {"float32": {"generate_s": ref_s}}
    for fmt in FORMATS:
        model = load_model(model_dir, fmt)
        out, seconds = greedy(model, prompts, num_tokens)
        errors, rel, top1 = [], [], []
        for seq, r in zip(sequences, ref_logits):
            q = teacher_forced_logits(model, seq)
            errors.append((q - r).abs().max().item())
            rel.append(errors[-1] / r.abs().max().item())
            top1.append((q.argmax(-1) == r.argmax(-1)).float().mean().item())
        agree = [first_difference(o, r) for o, r in zip(out, ref_out)]
        result[fmt] = {"max_logit_error": max(errors), "max_logit_error_rel": max(rel),
                       "teacher_forced_top1_agreement": statistics.mean(top1),
                       "greedy_tokens_before_first_difference": agree,
                       "greedy_mean_agreeing_tokens": statistics.mean(agree),
                       "greedy_prompts_identical": sum(a == num_tokens for a in agree),
                       "generate_s": seconds}
        del model
    return result


def options(p) -> None:
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--prompts", type=int, default=4)


def run(args) -> dict:
    results = {}
    for shape in args.shapes.split(","):
        with tempfile.TemporaryDirectory(prefix=f"llmesh-{shape}-") as tmp:
            kit.log(f"[quant_quality] {shape}: making a random checkpoint ...")
            results[shape] = measure(make_checkpoint(shape, Path(tmp)), args.prompts, args.tokens)
            kit.log(f"[quant_quality]   {results[shape]}")
    return {"results": results}


SPEC = kit.Spec("quant_quality", __doc__, options, run, model=None)

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
