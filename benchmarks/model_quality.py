"""What each CPU weight format costs in quality on a trained model, against
float32 transformers on the same dequantized weights.

The reference is transformers' own GGUF loader (float32) for a GGUF model, else
its safetensors loader. For llmesh's float32, bfloat16, float16-weights and int8:

- teacher-forced perplexity over `benchmarks/data/quality_text.txt` (about 3,000
  tokens written for this project, read in windows of `--window` tokens), and the
  mean KL divergence of llmesh's next-token distributions from the reference's
  over the same positions, with the share whose arg max agrees;
- greedy generation for `--prompts` chat questions of up to `--tokens` tokens:
  how many answers are identical to the reference's, and the mean share of each
  reference answer produced before the first difference.

A format whose perplexity is more than 2% above float32's is lossy
(docs/engine.md, "Weight formats on CPU").
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch

from llmesh.benchmarks import kit
from llmesh.benchmarks.quant_quality import first_difference, greedy, teacher_forced_logits
from llmesh.services.common.tokenizer import TextTokenizer
from llmesh.services.executor.weights import load_model

TEXT = Path(__file__).parent / "data" / "quality_text.txt"
FORMATS = ("float32", "bfloat16", "float16-weights", "int8")
LOSSY_PPL = 1.02
QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.",
    "Why is the sky blue?", "Write a haiku about autumn leaves.",
    "What is 12 plus 30?", "Explain what a lighthouse is for.",
    "Give two tips for sleeping well.", "What does a bee make?",
    "Translate 'good morning' into Spanish.", "What is the boiling point of water in Celsius?",
    "Describe a cat in one sentence.", "How many days are in a week?",
    "What is photosynthesis?", "Suggest a name for a small bakery.",
    "What are the three states of matter?", "Write one sentence about the sea.",
    "Who wrote Romeo and Juliet?", "What is the largest ocean on Earth?",
    "List four fruits that are red.", "How do you make a cup of tea?",
    "What is the opposite of 'ancient'?", "Why do we need to drink water?",
    "What is a noun? Give an example.", "Summarize the story of Cinderella in two sentences.",
    "What is the freezing point of water in Fahrenheit?", "Name a planet with rings.",
    "Give a synonym for 'happy'.", "What do plants need to grow?",
    "Write a short greeting for a birthday card.", "What is the square root of 81?",
    "Why do leaves change color in the fall?", "What is the main job of the heart?",
]


def reference_model(model_dir: Path):
    """transformers' float32 model of the same checkpoint (its own GGUF loader for a
    rendered GGUF directory)."""
    import json
    from transformers import AutoModelForCausalLM
    gguf = json.loads((model_dir / "config.json").read_text()).get("gguf_file")
    if gguf:
        return AutoModelForCausalLM.from_pretrained(str(Path(gguf).parent),
                                                    gguf_file=Path(gguf).name, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids) - 1, size) if len(ids[i:i + size]) > 1]


@torch.inference_mode()
def reference_run(hf, text_windows, prompts, num_tokens, eos_ids):
    log_probs = [torch.log_softmax(hf(torch.tensor([w])).logits[0].float(), -1)
                 for w in text_windows]
    answers = []
    for p in prompts:
        out = hf.generate(torch.tensor([p]), max_new_tokens=num_tokens, do_sample=False,
                          eos_token_id=list(eos_ids), pad_token_id=eos_ids[0])
        answers.append(out[0, len(p):].tolist())
    return log_probs, answers


def perplexity(log_probs: list[torch.Tensor], text_windows) -> float:
    nll = [-lp[:-1].gather(-1, torch.tensor(w[1:])[:, None]).sum().item()
           for lp, w in zip(log_probs, text_windows)]
    return math.exp(sum(nll) / sum(len(w) - 1 for w in text_windows))


def measure(model_dir: Path, num_prompts: int, num_tokens: int, window: int) -> dict:
    tok = TextTokenizer(model_dir)
    text_windows = windows(tok.encode(TEXT.read_text()), window)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}])
               for q in QUESTIONS[:num_prompts]]
    t0 = time.perf_counter()
    hf = reference_model(model_dir)
    eos = tuple(hf.generation_config.eos_token_id if isinstance(
        hf.generation_config.eos_token_id, list) else [hf.generation_config.eos_token_id])
    ref_lp, ref_answers = reference_run(hf, text_windows, prompts, num_tokens, eos)
    del hf
    result = {"reference": {"perplexity": perplexity(ref_lp, text_windows),
                            "seconds": time.perf_counter() - t0},
              "text_tokens": sum(map(len, text_windows)), "prompts": len(prompts),
              "max_tokens": num_tokens}
    kit.log(f"[model_quality] transformers float32: ppl {result['reference']['perplexity']:.3f}")
    for fmt in FORMATS:
        t0 = time.perf_counter()
        model = load_model(model_dir, fmt)
        lp = [torch.log_softmax(teacher_forced_logits(model, w).float(), -1) for w in text_windows]
        kl = [torch.sum(r.exp() * (r - q), -1).mean().item() for r, q in zip(ref_lp, lp)]
        top1 = [(r.argmax(-1) == q.argmax(-1)).float().mean().item() for r, q in zip(ref_lp, lp)]
        out, _ = greedy(model, prompts, num_tokens)
        out = [o[:next((i + 1 for i, t in enumerate(o) if t in eos), len(o))] for o in out]
        agree = [first_difference(o, r) / max(1, len(r)) for o, r in zip(out, ref_answers)]
        result[fmt] = {"perplexity": perplexity(lp, text_windows),
                       "mean_kl": statistics.mean(kl), "top1_agreement": statistics.mean(top1),
                       "greedy_identical": sum(o == r for o, r in zip(out, ref_answers)),
                       "greedy_mean_share_before_difference": statistics.mean(agree),
                       "seconds": time.perf_counter() - t0}
        del model
        kit.log(f"[model_quality] {fmt}: {result[fmt]}")
    base = result["float32"]["perplexity"]
    for fmt in FORMATS:
        result[fmt]["perplexity_vs_float32"] = result[fmt]["perplexity"] / base
        result[fmt]["is_lossy"] = result[fmt]["perplexity"] > LOSSY_PPL * base
    return result


def options(p) -> None:
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--window", type=int, default=1024)


def run(args) -> dict:
    return {"results": measure(Path(args.model), min(args.prompts, len(QUESTIONS)), args.tokens,
                               args.window)}


SPEC = kit.Spec("model_quality", __doc__, options, run, model="smollm2")

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
