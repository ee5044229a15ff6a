"""Speculative decoding, the scheduler's half: prompt-lookup (n-gram) drafts.

A sequence that speculates sends its last token and up to k draft tokens in one
step; the executor computes all k + 1 positions, samples each as plain decoding
would (the same logits rule, the same seeded draw keyed by position) and keeps
the drafts up to the first one that differs from what it sampled, plus that
sample: 1 to k + 1 tokens a step, and exactly the tokens plain decoding gives.

The drafts come from the sequence itself (no second model): the longest suffix
of its tokens (`ngram_max` down to `ngram_min` tokens) that occurred earlier,
most recent occurrence first, proposes the k tokens that followed it there.
Text that copies from its prompt (rewriting, editing, answering from a passage,
code) repeats such runs; free chat seldom does.

A speculating sequence drafts from all its tokens, so it must know its last
token before its next step is planned: while a step of its own is in flight it
waits (skips the plans made meanwhile: no pipelining for it) only when its
known tokens already end in a suffix that occurred before (a draft is likely
once the token in flight is known); otherwise it decodes pipelined, as plain
decoding does, so text with nothing to copy keeps the pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SpeculationConfig:
    num_tokens: int = 0  # k: the default per sequence (a request's own wins); 0 = off
    ngram_max: int = 4
    ngram_min: int = 2


class Speculator:
    """Which sequences speculate, their drafts, and what was accepted."""

    def __init__(self, config: SpeculationConfig, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        self.num_draft_tokens = 0  # drafts sent to the executor
        self.num_accepted_tokens = 0  # ... that it kept
        self.num_steps = 0  # sequence-steps with drafts

    def k_of(self, seq) -> int:
        """The drafts `seq` may take at most (0: it does not speculate): its request's
        `speculative_tokens`, else the replica's default; never before an n > 1
        request forks."""
        p = seq.params
        k = self.config.num_tokens if p.speculative_tokens is None else p.speculative_tokens
        return 0 if seq.is_fork_pending else k

    def waits(self, seq) -> bool:
        """`seq` skips this plan: it speculates, its last token is in flight, and its
        known tokens end in a suffix seen before (the lookup will likely draft)."""
        if not seq.num_pending or not self.k_of(seq):
            return False
        c = self.config
        return bool(propose(seq.token_ids, 1, c.ngram_max, c.ngram_min))

    def drafts(self, seq, num_new: int, budget: int) -> list[int]:
        """Drafts for `seq`'s next step, when it decodes (`num_new` 1) with its tokens
        all known: at most its k, what the token budget leaves, and what stays within
        its max_tokens and the context (the step makes one token more than it keeps
        drafts)."""
        if num_new != 1 or seq.num_pending:
            return []
        k = min(self.k_of(seq), budget - 1,
                seq.params.max_tokens - len(seq.output_token_ids) - 1,
                self.max_model_len - seq.num_tokens - 1)
        if k <= 0:
            return []
        c = self.config
        return propose(seq.token_ids, k, c.ngram_max, c.ngram_min)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.num_steps += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


def propose(tokens: list[int], k: int, ngram_max: int, ngram_min: int) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the
    longest suffix of `tokens` (of `ngram_max` down to `ngram_min` tokens); []
    when none occurs."""
    n_tokens = len(tokens)
    if k <= 0 or n_tokens <= ngram_min:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(ngram_max, n_tokens - 1), ngram_min - 1, -1):
        # where an earlier n-gram equals the suffix (the suffix itself left out)
        starts = np.flatnonzero(arr[:n_tokens - n] == arr[n_tokens - n])
        for j in range(1, n):
            if not starts.size:
                break
            starts = starts[arr[starts + j] == arr[n_tokens - n + j]]
        if starts.size:
            begin = int(starts[-1]) + n
            return arr[begin:begin + k].tolist()
    return []
