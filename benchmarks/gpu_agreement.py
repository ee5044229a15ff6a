"""Greedy agreement with transformers on a trained model, on the same weights and dtype.

For each dtype (`--dtypes`, default bfloat16,float16) the llmesh engine (CUDA graphs,
the paged kernels; once more with the paged prefill kernel switched on) and
transformers (`AutoModelForCausalLM`, eager attention, greedy `generate` per prompt)
answer the same `--prompts` chat questions with `--tokens` greedy tokens each. Both
read one float32 safetensors checkpoint: the model's own, or for a model served from
a GGUF file (SmolLM2-135M-Instruct ships as Q4_1) its dequantized weights as llmesh
loads them, written once. Reported per engine variant: answers identical to
transformers', tokens matched before the first difference, and at each first
difference transformers' logit margin there (its top-1 minus its top-2 logit, from a
teacher-forced pass over its own answer) with the rank llmesh's token had in
transformers' logits: a small margin is a near-tie that either side may break.

Without a GPU (`--device cpu`, float32 or bfloat16) it runs the same steps on the
CPU: the GPU session's dry run.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from llmesh.benchmarks import kit
from llmesh.benchmarks.llama_cpp import hf_checkpoint
from llmesh.benchmarks.model_quality import QUESTIONS
from llmesh.benchmarks.quant_quality import engine_greedy, first_difference
from llmesh.services.common.tokenizer import TextTokenizer
from llmesh.services.engine.engine import Engine, EngineConfig

VARIANTS = {"llmesh": "0", "llmesh-prefill-kernel": "1"}  # LLMESH_CUDA_PREFILL_KERNEL


def llmesh_answers(checkpoint: Path, prompts, num_tokens: int, device: str, dtype: str,
                   prefill_kernel: str) -> tuple[list[list[int]], float]:
    os.environ["LLMESH_CUDA_PREFILL_KERNEL"] = prefill_kernel
    return engine_greedy(Engine.from_pretrained(checkpoint, EngineConfig(
        device=device, dtype=dtype, max_num_seqs=len(prompts))), prompts, num_tokens)


@torch.inference_mode()
def transformers_answers(hf, prompts, num_tokens: int, device: str):
    """Greedy answers, one prompt at a time (no padding: a left-padded batch changed
    answers where no near-tie was), and a teacher-forced pass over each prompt +
    answer: the logits that chose every answer token."""
    answers, logits = [], []
    hf.generation_config.eos_token_id = None  # EOS is a token like any other (llmesh: ignore_eos)
    t0 = time.perf_counter()
    for p in prompts:
        out = hf.generate(input_ids=torch.tensor([p], device=device), max_new_tokens=num_tokens,
                          do_sample=False, pad_token_id=0)
        answers.append(out[0, len(p):].tolist())
    seconds = time.perf_counter() - t0
    for p, a in zip(prompts, answers):
        logits.append(hf(torch.tensor([p + a], device=device)).logits[0, len(p) - 1:-1].float().cpu())
    return answers, logits, seconds


def compare(ours, ref, ref_logits) -> dict:
    firsts, margins, ranks = [], [], []
    for o, r, lg in zip(ours, ref, ref_logits):
        i = first_difference(o, r)
        firsts.append(i)
        if i < min(len(o), len(r)):
            top2 = lg[i].topk(2).values
            margins.append(round(float(top2[0] - top2[1]), 4))
            ranks.append(int((lg[i] > lg[i, o[i]]).sum()))
    return {"identical": sum(o == r for o, r in zip(ours, ref)), "prompts": len(ref),
            "mean_tokens_before_difference": statistics.mean(firsts),
            "first_differences": [f for f in firsts if f < len(ref[0])],
            "margins_at_difference": margins, "our_token_rank_there": ranks}


def measure(model_dir: Path, num_prompts: int, num_tokens: int, device: str,
            dtypes: list[str]) -> dict:
    from transformers import AutoModelForCausalLM
    checkpoint = hf_checkpoint(model_dir)
    tok = TextTokenizer(model_dir)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}])
               for q in (QUESTIONS * 2)[:num_prompts]]
    result = {"checkpoint": str(checkpoint), "device": device,
              "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    for dtype in dtypes:
        hf = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=getattr(torch, dtype),
                                                  attn_implementation="eager").to(device)
        ref, ref_logits, ref_s = transformers_answers(hf, prompts, num_tokens, device)
        del hf
        row = {"transformers_generate_s": round(ref_s, 2)}
        for name, flag in VARIANTS.items():
            if flag == "1" and device != "cuda":
                continue  # the prefill kernel is CUDA only
            ours, seconds = llmesh_answers(checkpoint, prompts, num_tokens, device, dtype, flag)
            row[name] = {**compare(ours, ref, ref_logits), "generate_s": round(seconds, 2)}
            kit.log(f"[gpu_agreement] {dtype} {name}: {row[name]['identical']}/{len(prompts)} "
                    f"identical, margins at differences {row[name]['margins_at_difference']}")
        result[dtype] = row
    return result


def options(p) -> None:
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", default="bfloat16,float16")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)


def run(args) -> dict:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA device on this machine (use --device cpu for a dry run)")
    return {"results": measure(Path(args.model), args.prompts, args.tokens, args.device,
                               args.dtypes.split(","))}


SPEC = kit.Spec("gpu_agreement", __doc__, options, run, model="smollm2")

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
