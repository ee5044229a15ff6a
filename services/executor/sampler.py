"""Sampling for a batch of rows, one row per sequence that produces a token.

Order: penalties (repetition on prompt + output, presence / frequency on
output) -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> draw.
Draws use counter-based noise: the uniform for (seed, index, position, token)
comes from an integer hash, so a seeded request gets the same tokens whatever
it is batched with, after preemption, and on any device. Logprobs are those of
the model's distribution (log-softmax of the raw logits).

Every per-row input (noise keys, parameters, the token lists penalties count)
is built on the host before the step's forward, with vectorised code, and
reaches the device with the step's other inputs (`SamplingBatch`, through the
runner's `Staging`); the tokens and logprobs come back in one copy.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.common.step_plan import TokenLogprobs
from llmesh.services.executor.staging import Staged, Staging

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


def row_keys(seeds: np.ndarray, indices: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """`row_key` of many rows at once (uint64 arrays in, int64 keys out)."""
    m = np.uint64(_M32)
    key = _mix32_np(positions & m)
    key = _mix32_np(key ^ (indices & m))
    key = _mix32_np(key ^ (seeds & m))
    return _mix32_np(key ^ ((seeds >> np.uint64(32)) & m)).astype(np.int64)


def _mix32_np(x: np.ndarray) -> np.ndarray:
    m = np.uint64(_M32)
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x85EBCA6B)) & m
    x = x ^ (x >> np.uint64(13))
    x = (x * np.uint64(0xC2B2AE35)) & m
    return x ^ (x >> np.uint64(16))


def exponential_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise `[rows, vocab]` (float64), a pure function of (key, column)."""
    cols = _mix32(torch.arange(vocab_size, dtype=torch.int64, device=keys.device) + 0x9E3779B9)
    h = _mix32(_mix32(keys[:, None] ^ cols[None, :]) ^ 0x6A09E667)
    u = (h.double() + 0.5) / 4294967296.0
    return -torch.log(u)


@dataclass
class SampleRow:
    params: SamplingParams  # (seeded: params.seed)
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


class SamplingBatch:
    """The sampling inputs of a step's rows, staged before the forward: which rows
    draw (with their noise keys, temperature, top-k/p and min-p), the penalties
    and the token lists they count, and which rows want logprobs."""

    def __init__(self, rows: list[SampleRow], staging: Staging):
        self.rows = rows
        params = [r.params for r in rows]
        self.draws = [i for i, p in enumerate(params) if not p.is_greedy]
        self.random: dict[str, Staged] = {}
        if self.draws:
            d = [rows[i] for i in self.draws]
            u64 = np.uint64
            keys = row_keys(np.fromiter((r.params.seed for r in d), u64, len(d)),
                            np.fromiter((r.index for r in d), u64, len(d)),
                            np.fromiter((r.position for r in d), u64, len(d)))
            dp = [r.params for r in d]
            self.random = {
                "rows": staging.put(np.asarray(self.draws, np.int64)),
                "keys": staging.put(keys),
                "temperature": staging.put(np.asarray([p.temperature for p in dp], np.float32)),
                "top_k": staging.put(np.asarray([p.top_k for p in dp], np.int64)),
                "top_p": staging.put(np.asarray([p.top_p for p in dp], np.float32)),
                "min_p": staging.put(np.asarray([p.min_p for p in dp], np.float32))}
            self.any_top_k = any(p.top_k for p in dp)
            self.any_top_p = any(p.top_p < 1.0 for p in dp)
            self.any_min_p = any(p.min_p for p in dp)
        rep = [p.repetition_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        self.any_rep = any(p != 1.0 for p in rep)
        self.any_counts = any(freq) or any(pres)
        self.penalties: dict[str, Staged] = {}
        if self.any_rep or self.any_counts:
            self.penalties = {"rep": staging.put(np.asarray(rep, np.float32)),
                              "freq": staging.put(np.asarray(freq, np.float32)),
                              "pres": staging.put(np.asarray(pres, np.float32)),
                              "output": _stage_ids([r.output_ids for r in rows], staging)}
            if self.any_rep:
                self.penalties["prompt"] = _stage_ids([r.prompt_ids for r in rows], staging)
        self.logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        self.logprob_k = max((params[i].logprobs for i in self.logprob_rows), default=0)
        self.staged_logprob_rows = staging.put(np.asarray(self.logprob_rows, np.int64)) \
            if self.logprob_rows else None


    @classmethod
    def plain(cls, staging: Staging, temperature: np.ndarray, top_k: np.ndarray,
              top_p: np.ndarray, min_p: np.ndarray, seeds: np.ndarray, indices: np.ndarray,
              positions: np.ndarray) -> "SamplingBatch":
        """The inputs of rows with neither penalties nor logprobs, from per-row arrays
        (the runner's persistent batch) instead of SampleRows: the same keys and
        parameters, with no Python per row."""
        self = cls.__new__(cls)
        self.rows = []
        draws = np.flatnonzero(temperature != 0.0)
        self.draws = draws.tolist()
        self.random = {}
        if self.draws:
            self.random = {
                "rows": staging.put(draws.astype(np.int64)),
                "keys": staging.put(row_keys(seeds[draws], indices[draws],
                                             positions[draws].astype(np.uint64))),
                "temperature": staging.put(temperature[draws]),
                "top_k": staging.put(top_k[draws]),
                "top_p": staging.put(top_p[draws]),
                "min_p": staging.put(min_p[draws])}
            self.any_top_k = bool(top_k[draws].any())
            self.any_top_p = bool((top_p[draws] < 1.0).any())
            self.any_min_p = bool(min_p[draws].any())
        self.any_rep = self.any_counts = False
        self.penalties = {}
        self.logprob_rows, self.logprob_k, self.staged_logprob_rows = [], 0, None
        return self


def _stage_ids(id_lists: list[list[int]], staging: Staging) -> tuple[Staged, Staged]:
    """(row of each id, id) flattened, for counting tokens per row on the device."""
    lens = np.fromiter((len(ids) for ids in id_lists), np.int64, len(id_lists))
    flat = np.fromiter(itertools.chain.from_iterable(id_lists), np.int64, int(lens.sum()))
    return staging.put(np.repeat(np.arange(len(id_lists)), lens)), staging.put(flat)


def sample(logits: torch.Tensor, rows: list[SampleRow], grammars: list | None = None,
           batch: SamplingBatch | None = None
           ) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits: [num_rows, vocab] float32 -> one token id (and optional logprobs) per row.
    `grammars`: per row, a SequenceGrammar (structured output) or None: its row keeps
    only the tokens the grammar allows. Logprobs are the model's own (unmasked).
    `batch`: the rows' inputs, staged and flushed with the step's (made here if None)."""
    if batch is None:
        staging = Staging(logits.device)
        batch = SamplingBatch(rows, staging)
        staging.flush()
    num_rows, vocab = logits.shape
    raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.logprob_rows else None
    if grammars is not None and any(g is not None for g in grammars):
        from llmesh.services.executor.grammar import apply_masks
        apply_masks(logits, grammars)
    logits = _apply_penalties(logits, batch)
    tokens = logits.argmax(dim=-1)
    if batch.draws:
        r = batch.random
        idx = r["rows"].tensor
        probs = _filtered_probs(logits[idx], batch)
        scores = probs.double() / exponential_noise(r["keys"].tensor, vocab)
        tokens[idx] = scores.argmax(dim=-1)
    return _to_host(tokens, raw_logprobs, batch)


def _to_host(tokens: torch.Tensor, raw_logprobs, batch: SamplingBatch
             ) -> tuple[list[int], list[TokenLogprobs | None]]:
    """The tokens, and the logprobs rows asked for, in one device-to-host copy."""
    num_rows = tokens.shape[0]
    logprobs: list[TokenLogprobs | None] = [None] * num_rows
    if not batch.logprob_rows:
        return tokens.tolist(), logprobs
    idx = batch.staged_logprob_rows.tensor
    rows_lp = raw_logprobs[idx]
    parts = [tokens.double(), rows_lp.gather(1, tokens[idx][:, None]).double().flatten()]
    k = batch.logprob_k
    if k:
        top = rows_lp.topk(k)
        parts += [top.values.double().flatten(), top.indices.double().flatten()]
    flat = torch.cat(parts).tolist()  # (ids below 2^53: exact as doubles)
    token_list = [int(t) for t in flat[:num_rows]]
    m = len(batch.logprob_rows)
    chosen = flat[num_rows:num_rows + m]
    values = flat[num_rows + m:num_rows + m + m * k]
    ids = flat[num_rows + m + m * k:]
    for j, i in enumerate(batch.logprob_rows):
        ki = batch.rows[i].params.logprobs
        logprobs[i] = TokenLogprobs(
            token_id=token_list[i], logprob=chosen[j],
            top_ids=[int(t) for t in ids[j * k:j * k + ki]],
            top_logprobs=values[j * k:j * k + ki])
    return token_list, logprobs


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if not batch.penalties:
        return logits
    p = batch.penalties
    vocab = logits.shape[1]
    counts = _token_counts(*p["output"], logits.shape[0], vocab)  # [rows, vocab]
    logits = logits.clone()
    if batch.any_rep:
        seen = (_token_counts(*p["prompt"], logits.shape[0], vocab) + counts) > 0
        penalty = p["rep"].tensor[:, None].expand_as(logits)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if batch.any_counts:
        logits -= p["freq"].tensor[:, None] * counts
        logits -= p["pres"].tensor[:, None] * (counts > 0).float()
    return logits


def _token_counts(rows: Staged, ids: Staged, num_rows: int, vocab: int) -> torch.Tensor:
    counts = torch.zeros(num_rows, vocab, device=ids.tensor.device)
    if ids.tensor.numel():
        counts.index_put_((rows.tensor, ids.tensor),
                          torch.ones(ids.tensor.numel(), device=counts.device), accumulate=True)
    return counts


def _filtered_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    r = batch.random
    logits = logits / r["temperature"].tensor[:, None]
    if batch.any_top_k:
        vocab = logits.shape[-1]
        k = r["top_k"].tensor
        k = torch.where((k > 0) & (k < vocab), k, torch.full_like(k, vocab))
        sorted_desc = logits.sort(dim=-1, descending=True).values
        kth = sorted_desc.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if batch.any_top_p:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= r["top_p"].tensor[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if batch.any_min_p:
        threshold = r["min_p"].tensor[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs
