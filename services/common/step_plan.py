"""The scheduler -> executor contract of one engine step, as plain dataclasses.

A sequence is sent in full once (`NewSequence`), then only as diffs
(`ScheduledSequence`: how many tokens to compute, how its block table
changed). The executor keeps the rest (tokens, sampling state) itself and
appends the tokens it samples. In the mesh these map 1:1 onto proto messages.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from llmesh.services.common.sampling_params import SamplingParams


def sequence_id(request_id: str, index: int) -> str:
    """Id of the index-th sequence of a request (n > 1 forks after the prompt)."""
    return request_id if index == 0 else f"{request_id}#{index}"


@dataclass
class NewSequence:
    seq_id: str
    token_ids: list[int]  # prompt, plus outputs so far when resuming after preemption
    num_prompt_tokens: int
    params: SamplingParams  # (seeded: params.seed keys the RNG with index and position)
    index: int  # which of the request's n sequences
    num_computed: int  # prefix-cache hits
    block_ids: list[int]


@dataclass
class ScheduledSequence:
    seq_id: str
    num_new_tokens: int  # (drafts included)
    num_kept_blocks: int  # the block table keeps its first num_kept_blocks entries ...
    new_block_ids: list[int]  # ... and continues with these
    # speculative decoding: tokens after its last one to verify (the step's last
    # len(draft_token_ids) inputs); it samples every position and keeps the drafts
    # up to the first that differs from its sample, and that sample
    draft_token_ids: list[int] = field(default_factory=list)


@dataclass
class StepPlan:
    step_id: int
    new: list[NewSequence] = field(default_factory=list)
    scheduled: list[ScheduledSequence] = field(default_factory=list)  # includes the new ones
    finished_seq_ids: list[str] = field(default_factory=list)  # drop their state
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), before compute
    traceparent: str = ""  # W3C context of the scheduler's step span ("" = not traced)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class StepResult:
    """Per sampled sequence: the new token(s). A parent with n > 1 samples n at once
    (one each); a sequence with drafts, the drafts it kept and the token after them."""

    step_id: int
    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    forward_s: float = 0.0
    sample_s: float = 0.0
    comm_s: float = 0.0  # tensor-parallel collectives inside this step
    num_kv_blocks: int = 0  # the KV blocks this rank holds
    kv_epoch: int = 0  # identity of the rank's KV memory (changes when the rank restarts)
