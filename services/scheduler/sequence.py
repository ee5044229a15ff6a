"""The scheduler's view of one sequence (a request with n > 1 forks into n)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from llmesh.services.common.finish_reason import FinishReason  # noqa: F401 (re-exported)
from llmesh.services.common.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    # its last token is being sampled by a step in flight: it holds no slot and no
    # blocks any more (the executor runs steps in order, so they can be reused now)
    FINISHING = "finishing"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: str
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams  # seeded (SamplingParams.with_seed)
    arrival_s: float
    salt: str = ""
    tenant: str = ""  # fairness accounting
    priority: str = "standard"  # scheduling class
    arrival_step: int = 0  # engine step at arrival (aging)
    order: int = 0  # arrival order, the tie-breaker
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    num_failures: int = 0  # executor failures in a row it was running through
    # tokens sampled by steps still in flight (pipelined scheduling plans the next
    # step assuming they come); at most 1 when a step is planned
    num_pending: int = 0
    incarnation: int = 0  # +1 at each preemption: results of older steps are stale
    text: object = None  # its TextStream when the replica makes text (stop strings)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    # speculative decoding: the drafts it sent and those kept
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def __post_init__(self):
        self._tokens = self.prompt_token_ids + self.output_token_ids

    def append_token(self, token: int) -> None:
        self.output_token_ids.append(token)
        self._tokens.append(token)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def is_fork_pending(self) -> bool:
        """Its next sampled token forks it into n sequences."""
        return self.params.n > 1 and self.index == 0 and not self.output_token_ids

    @property
    def token_ids(self) -> list[int]:
        """Prompt and output tokens (the sequence's own list: do not modify)."""
        return self._tokens
