"""The scheduler's view of one sequence (a request with n > 1 forks into n)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from services.common.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop token
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"
    DEADLINE = "deadline"  # the request's deadline passed
    ERROR = "error"  # the replica failed under it


@dataclass
class Sequence:
    seq_id: str
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
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
    is_known_to_executor: bool = False  # sent in full once; afterwards diffs only
    num_preemptions: int = 0
    num_failures: int = 0  # executor failures in a row it was running through
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids
