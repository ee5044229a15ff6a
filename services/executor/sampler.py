"""Sampling for a batch of rows, one row per sequence that produces a token.

Order: penalties (repetition on prompt + output, presence / frequency on
output) -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> draw.
Draws use counter-based noise: the uniform for (seed, index, position, token)
comes from an integer hash, so a seeded request gets the same tokens whatever
it is batched with, after preemption, and on any device. Logprobs are those of
the model's distribution (log-softmax of the raw logits).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from services.common.sampling_params import SamplingParams
from services.common.step_plan import TokenLogprobs

_M32 = 0xFFFFFFFF


def _mix32(x):
    """murmur3's 32-bit finaliser; works on Python ints and int64 tensors."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def row_key(seed: int, index: int, position: int) -> int:
    key = _mix32(position & _M32)
    key = _mix32(key ^ (index & _M32))
    key = _mix32(key ^ (seed & _M32))
    return _mix32(key ^ ((seed >> 32) & _M32))


def exponential_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise `[rows, vocab]` (float64), a pure function of (key, column)."""
    cols = _mix32(torch.arange(vocab_size, dtype=torch.int64, device=keys.device) + 0x9E3779B9)
    h = _mix32(_mix32(keys[:, None] ^ cols[None, :]) ^ 0x6A09E667)
    u = (h.double() + 0.5) / 4294967296.0
    return -torch.log(u)


@dataclass
class SampleRow:
    params: SamplingParams
    seed: int
    index: int
    position: int  # position of the token being drawn
    token_ids: list[int]  # the sequence so far (not copied: sliced only for penalties)
    num_prompt_tokens: int

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


def sample(logits: torch.Tensor, rows: list[SampleRow],
           grammars: list | None = None) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits: [num_rows, vocab] float32 -> one token id (and optional logprobs) per row.
    `grammars`: per row, a SequenceGrammar (structured output) or None: its row keeps
    only the tokens the grammar allows. Logprobs are the model's own (unmasked)."""
    num_rows, vocab = logits.shape
    want_logprobs = [r.params.logprobs is not None for r in rows]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
    if grammars is not None and any(g is not None for g in grammars):
        from services.executor.grammar import apply_masks
        apply_masks(logits, grammars)
    logits = _apply_penalties(logits, rows)
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(rows) if not r.params.is_greedy]
    if random_rows:
        idx = torch.tensor(random_rows, device=logits.device)
        probs = _filtered_probs(logits[idx], [rows[i].params for i in random_rows])
        keys = torch.tensor([row_key(rows[i].seed, rows[i].index, rows[i].position)
                             for i in random_rows], dtype=torch.int64, device=logits.device)
        scores = probs.double() / exponential_noise(keys, vocab)
        tokens[idx] = scores.argmax(dim=-1)
    token_list = tokens.tolist()
    logprobs: list[TokenLogprobs | None] = [None] * num_rows
    for i, row in enumerate(rows):
        if want_logprobs[i]:
            logprobs[i] = _logprobs(raw_logprobs[i], token_list[i], row.params.logprobs)
    return token_list, logprobs


def _apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    rep = [r.params.repetition_penalty for r in rows]
    freq = [r.params.frequency_penalty for r in rows]
    pres = [r.params.presence_penalty for r in rows]
    if all(p == 1.0 for p in rep) and not any(freq) and not any(pres):
        return logits
    num_rows, vocab = logits.shape
    device = logits.device
    counts = _token_counts([r.output_ids for r in rows], vocab, device)  # [rows, vocab]
    logits = logits.clone()
    if any(p != 1.0 for p in rep):
        seen = (_token_counts([r.prompt_ids for r in rows], vocab, device) + counts) > 0
        penalty = torch.tensor(rep, device=device)[:, None].expand_as(logits)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if any(freq) or any(pres):
        logits -= torch.tensor(freq, device=device)[:, None] * counts
        logits -= torch.tensor(pres, device=device)[:, None] * (counts > 0).float()
    return logits


def _token_counts(id_lists: list[list[int]], vocab: int, device) -> torch.Tensor:
    counts = torch.zeros(len(id_lists), vocab, device=device)
    row_idx = [i for i, ids in enumerate(id_lists) for _ in ids]
    if row_idx:
        flat = [t for ids in id_lists for t in ids]
        counts.index_put_((torch.tensor(row_idx, device=device), torch.tensor(flat, device=device)),
                          torch.ones(len(flat), device=device), accumulate=True)
    return counts


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    device = logits.device
    temp = torch.tensor([p.temperature for p in params], device=device)[:, None]
    logits = logits / temp
    top_k = [p.top_k for p in params]
    if any(top_k):
        vocab = logits.shape[-1]
        k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=device)
        sorted_desc = logits.sort(dim=-1, descending=True).values
        kth = sorted_desc.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    top_p = [p.top_p for p in params]
    if any(p < 1.0 for p in top_p):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= torch.tensor(top_p, device=device)[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    min_p = [p.min_p for p in params]
    if any(min_p):
        threshold = torch.tensor(min_p, device=device)[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _logprobs(row_logprobs: torch.Tensor, token_id: int, k: int) -> TokenLogprobs:
    top = row_logprobs.topk(k) if k else None
    return TokenLogprobs(
        token_id=token_id,
        logprob=float(row_logprobs[token_id]),
        top_ids=top.indices.tolist() if top is not None else [],
        top_logprobs=top.values.tolist() if top is not None else [],
    )
