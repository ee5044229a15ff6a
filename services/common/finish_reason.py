"""Why a sequence ended: the domain's finish reasons (proto mapping in convert.py)."""
from __future__ import annotations

import enum


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"
    DEADLINE = "deadline"  # the request's deadline passed
    ERROR = "error"  # the replica failed under it
    TOOL_CALLS = "tool_calls"  # the model called tools (set by the router, which reads calls)
