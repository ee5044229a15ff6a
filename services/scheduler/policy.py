"""Who waits, who runs next: priority classes with aging, per-tenant fairness, bounded queues.

The waiting queue is one FIFO per (class, tenant). Choosing the next request:

- within a class, the tenant served the fewest tokens so far goes first (a
  virtual token counter, VTC): a tenant sending 10x the load gets no more than
  its share while others wait. A tenant that comes back after an idle spell is
  lifted to the smallest counter among those waiting, so idling banks no credit;
- across classes, the head with the highest effective priority goes first:
  its class weight plus one per `aging_steps` engine steps it has waited, so a
  batch request waiting long enough outranks a fresh interactive one and
  nothing starves.

With `priorities` off the queue is plain FCFS across everything (the old
behaviour, kept for A/B measurements).

The same effective priority orders running sequences for preemption: the
lowest (batch first, newest first) loses its blocks first.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from llmesh.services.common.errors import LlmeshError
from llmesh.services.scheduler.sequence import Sequence

CLASSES = ("interactive", "standard", "batch")
DEFAULT_CLASS = "standard"


@dataclass(frozen=True)
class ClassLimits:
    weight: float
    max_queued_requests: int = 256  # waiting requests of this class; 0 = unbounded
    max_queued_tokens: int = 65536  # their prompt tokens; 0 = unbounded
    timeout_s: float = 0.0  # default server-side deadline; 0 = none
    # refuse a request whose predicted queue wait exceeds this (services/scheduler/slo.py);
    # 0 = no SLO admission for the class
    ttft_budget_s: float = 0.0


def _default_classes() -> dict[str, ClassLimits]:
    return {"interactive": ClassLimits(weight=4.0, max_queued_requests=128,
                                       max_queued_tokens=32768, ttft_budget_s=2.0),
            "standard": ClassLimits(weight=2.0, ttft_budget_s=15.0),
            "batch": ClassLimits(weight=1.0, max_queued_requests=1024,
                                 max_queued_tokens=262144, ttft_budget_s=600.0)}


@dataclass(frozen=True)
class SchedulingPolicy:
    priorities: bool = True  # False: FCFS across classes and tenants, no priority preemption
    classes: dict[str, ClassLimits] = field(default_factory=_default_classes)
    aging_steps: int = 256  # a waiting request gains one weight unit per this many steps
    kv_watermark: float = 0.1  # share of KV blocks new requests leave free for running ones
    input_token_cost: float = 1.0  # virtual token counter: cost of a prompt token ...
    output_token_cost: float = 2.0  # ... and of a generated one

    def limits(self, cls: str) -> ClassLimits:
        return self.classes.get(cls) or self.classes[DEFAULT_CLASS]

    def weight(self, cls: str) -> float:
        return self.limits(cls).weight if self.priorities else 1.0


def policy_from_dict(d: dict) -> SchedulingPolicy:
    """The policy from mesh.yaml's `admission` section (a plain dict; unknown keys ignored)."""
    classes = _default_classes()
    for name, overrides in (d.get("classes") or {}).items():
        base = classes.get(name, classes[DEFAULT_CLASS])
        classes[name] = ClassLimits(**{**base.__dict__, **(overrides or {})})
    base = SchedulingPolicy()
    return SchedulingPolicy(priorities=d.get("priorities", base.priorities), classes=classes,
                            aging_steps=d.get("aging_steps", base.aging_steps),
                            kv_watermark=d.get("kv_watermark", base.kv_watermark))


class QueueFullError(LlmeshError):
    """A class's queue is at its bound, or its predicted wait past the class's TTFT
    budget. Maps to RESOURCE_EXHAUSTED with retry pushback."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, cls: str, what: str, retry_after_s: float = 0.0, reason: str = "queue_full"):
        super().__init__(f"queue of class {cls!r} is full ({what}); retry later")
        self.cls = cls
        self.retry_after_s = retry_after_s
        self.reason = reason


class WaitQueue:
    """Waiting sequences, one FIFO per (class, tenant), with VTC counters per tenant."""

    def __init__(self, policy: SchedulingPolicy):
        self.policy = policy
        self._queues: dict[tuple[str, str], deque[Sequence]] = {}
        self._count = 0
        self.depth: dict[str, int] = dict.fromkeys(CLASSES, 0)
        self.queued_tokens: dict[str, int] = dict.fromkeys(CLASSES, 0)
        # output tokens the waiting sequences may still generate (max_tokens left, x n)
        self.queued_decode: dict[str, int] = dict.fromkeys(CLASSES, 0)
        self._tenant_waiting: dict[str, int] = {}
        self.served: dict[str, float] = {}  # the virtual token counters

    # ---- bookkeeping -------------------------------------------------
    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[Sequence]:
        for q in list(self._queues.values()):
            yield from q

    def check_room(self, cls: str, num_prompt_tokens: int) -> None:
        """Raise QueueFullError when one more request of `cls` would pass its bounds."""
        lim = self.policy.limits(cls)
        if lim.max_queued_requests and self.depth.get(cls, 0) >= lim.max_queued_requests:
            raise QueueFullError(cls, f"{lim.max_queued_requests} requests")
        if lim.max_queued_tokens and self.queued_tokens.get(cls, 0) + num_prompt_tokens \
                > lim.max_queued_tokens and self.depth.get(cls, 0):
            raise QueueFullError(cls, f"{lim.max_queued_tokens} prompt tokens")

    def tokens_ahead(self, cls: str) -> tuple[int, int]:
        """(prompt tokens, output tokens still to generate) queued in `cls` and in the
        classes that outrank it."""
        weight = self.policy.weight(cls)
        ahead = [c for c in self.queued_tokens if self.policy.weight(c) >= weight]
        return (sum(self.queued_tokens[c] for c in ahead),
                sum(self.queued_decode.get(c, 0) for c in ahead))

    @property
    def num_queued_tokens(self) -> int:
        return sum(self.queued_tokens.values())

    def _enter(self, seq: Sequence) -> None:
        tenant = seq.tenant
        if not self._tenant_waiting.get(tenant):
            # back from idle: start level with the least-served waiting tenant
            waiting = [self.served.get(t, 0.0) for t, n in self._tenant_waiting.items() if n]
            floor = min(waiting) if waiting else max(self.served.values(), default=0.0)
            self.served[tenant] = max(self.served.get(tenant, 0.0), floor)
        self._tenant_waiting[tenant] = self._tenant_waiting.get(tenant, 0) + 1
        self._count += 1
        self.depth[seq.priority] = self.depth.get(seq.priority, 0) + 1
        self.queued_tokens[seq.priority] = self.queued_tokens.get(seq.priority, 0) + seq.num_tokens
        self.queued_decode[seq.priority] = self.queued_decode.get(seq.priority, 0) + _decode(seq)

    def _leave(self, seq: Sequence) -> None:
        self._tenant_waiting[seq.tenant] -= 1
        self._count -= 1
        self.depth[seq.priority] -= 1
        self.queued_tokens[seq.priority] -= seq.num_tokens
        self.queued_decode[seq.priority] -= _decode(seq)

    def append(self, seq: Sequence) -> None:
        self._enter(seq)
        self._queues.setdefault((seq.priority, seq.tenant), deque()).append(seq)

    def appendleft(self, seq: Sequence) -> None:
        """A preempted sequence goes back to the head of its own queue."""
        self._enter(seq)
        self._queues.setdefault((seq.priority, seq.tenant), deque()).appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of the queue, wherever it is (`best` returns heads: O(1))."""
        key = (seq.priority, seq.tenant)
        q = self._queues[key]
        if q[0] is seq:
            q.popleft()
        else:
            q.remove(seq)
        if not q:  # never keep an empty queue: `best` reads every queue's head
            del self._queues[key]
        self._leave(seq)

    def charge(self, tenant: str, num_input: int, num_output: int) -> None:
        p = self.policy
        self.served[tenant] = self.served.get(tenant, 0.0) + \
            num_input * p.input_token_cost + num_output * p.output_token_cost

    # ---- choice ------------------------------------------------------
    def effective_priority(self, seq: Sequence, step: int) -> float:
        return self.policy.weight(seq.priority) + \
            max(0, step - seq.arrival_step) / max(1, self.policy.aging_steps)

    def best(self, step: int) -> Sequence | None:
        """The sequence to admit next, or None when nothing waits."""
        if not self._count:
            return None
        if not self.policy.priorities:  # FCFS: the oldest head (preempted ones are oldest)
            return min((q[0] for q in self._queues.values()), key=lambda s: s.order)
        per_class: dict[str, Sequence] = {}
        for (cls, tenant), q in self._queues.items():
            head = q[0]
            cur = per_class.get(cls)
            if cur is None or (self.served.get(tenant, 0.0), head.order) < \
                    (self.served.get(cur.tenant, 0.0), cur.order):
                per_class[cls] = head
        return max(per_class.values(),
                   key=lambda s: (self.effective_priority(s, step), -s.order))


def _decode(seq: Sequence) -> int:
    left = max(0, seq.params.max_tokens - len(seq.output_token_ids))
    return left * seq.params.n if seq.is_fork_pending else left
