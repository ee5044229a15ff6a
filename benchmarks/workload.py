"""Seeded offline workload: long-tailed prompt and output lengths, fixed by ignore_eos."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


def long_tailed(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(rng.lognormvariate(0.0, sigma) * median))))


def offline_workload(num_requests: int, vocab_size: int, seed: int = 0, max_prompt: int = 1024,
                     max_output: int = 512, bos_token_id: int = 0) -> list[BenchRequest]:
    """Prompts about 16..max_prompt tokens (median 128), outputs 8..max_output (median 64)."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(num_requests):
        num_prompt = long_tailed(rng, 128, 0.9, 16, max_prompt)
        num_output = long_tailed(rng, 64, 1.0, 8, max_output)
        prompt = [bos_token_id] + [rng.randrange(8, vocab_size) for _ in range(num_prompt - 1)]
        reqs.append(BenchRequest(prompt, num_output))
    return reqs
