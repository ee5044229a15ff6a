"""Iteration-level continuous batching over a KV cache manager, with priorities.

Each `schedule()` builds one StepPlan under a token budget and a cap on
running sequences: running sequences first (decode tokens and the rest of
chunked prefills), then waiting ones in the order the WaitQueue chooses
(priority class with aging, then the least-served tenant), each taking as many
prompt tokens as the budget leaves (chunked prefill) after prefix-cache hits.
New requests leave a watermark of blocks free for the running ones' growth.

Preemption is by recompute: blocks are freed and the sequence returns to the
head of its queue. When blocks run out the lowest-priority running sequence
(batch first, newest first) goes; and when a higher class waits for memory,
lower-class running sequences are preempted to make room before the step.

Scheduling is pipelined: the next step is planned while the current one runs.
A sequence's `num_computed` advances when a step is planned, and a step that
samples leaves a pending token the scheduler does not know yet; the next plan
assumes it comes (the executor has it by then: it runs plans in order).
`update` reconciles each step's result: a sequence that turned out finished
(EOS, a stop string) is dropped then, and the one step already planned for it
is wasted. A sequence whose pending token is its last by length retires at
once (`FINISHING`): it is never planned past its end, and its slot and blocks
go to others in the very next plan. Results for a sequence preempted since
they were planned are stale and ignored.

A step's result is applied by the result side (`update`, in
services/scheduler/step_results.py). A plain decode token (no drafts, its block
its own) takes a short path through both sides: the bulk of a step at large
batches, and a Python loop per sequence, so it builds nothing the general
path's bookkeeping would only read once.

Speculative decoding (services/scheduler/speculation.py): a decoding sequence
that speculates is planned with draft tokens after its last one; the step
returns the drafts the executor kept and the token after them, and only then
does the sequence's `num_computed` count the kept drafts. While a step of its
own is in flight it is not planned again when its known tokens suggest a draft
(it drafts from all its tokens); otherwise it is pipelined like any other.
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

from llmesh.services.common.finish_reason import FinishReason
from llmesh.services.common.step_plan import NewSequence, ScheduledSequence, StepPlan, sequence_id
from llmesh.services.scheduler.kv_manager import KVCacheManager
from llmesh.services.scheduler.policy import SchedulingPolicy, WaitQueue
from llmesh.services.scheduler.sequence import Sequence, SeqStatus
from llmesh.services.scheduler.speculation import SpeculationConfig, Speculator
from llmesh.services.scheduler.step_results import PlannedSeq, SeqOutput, StepResults

__all__ = ["Scheduler", "SchedulerConfig", "SeqOutput"]


@dataclass(frozen=True)
class SchedulerConfig:
    max_model_len: int
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    eos_token_ids: tuple[int, ...] = ()
    policy: SchedulingPolicy = SchedulingPolicy()
    speculation: SpeculationConfig = SpeculationConfig()


_BY_ORDER = operator.attrgetter("order")


class Scheduler(StepResults):
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.policy = config.policy
        self.waiting = WaitQueue(config.policy)
        self.running: list[Sequence] = []
        self.seqs: dict[str, Sequence] = {}
        self.request_seqs: dict[str, list[str]] = {}
        self._dropped: list[str] = []  # sequences the executor should forget
        self._in_flight: dict[int, list[PlannedSeq]] = {}  # step id -> what it computes
        self._step_id = 0
        self.num_preemptions = 0
        self._order = itertools.count()
        self.speculator = Speculator(config.speculation, config.max_model_len)

    # ---- requests -----------------------------------------------------
    def add(self, *seqs: Sequence) -> None:
        """Queue a new request: one sequence, or (a moved n > 1 request) its unfinished
        choices; QueueFullError (nothing changed) when its class is full."""
        self.waiting.check_room(seqs[0].priority, sum(seq.num_tokens for seq in seqs))
        for seq in seqs:
            seq.arrival_step = self._step_id
            seq.order = next(self._order)
            self.seqs[seq.seq_id] = seq
            self.request_seqs.setdefault(seq.request_id, []).append(seq.seq_id)
            self.waiting.append(seq)

    def has_request(self, request_id: str) -> bool:
        return request_id in self.request_seqs

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> list[SeqOutput]:
        """Stop every sequence of the request now and free its blocks."""
        outputs = []
        for seq_id in self.request_seqs.get(request_id, []):
            seq = self.seqs[seq_id]
            if seq.status is SeqStatus.WAITING:
                self.waiting.remove(seq)
            elif seq.status is SeqStatus.RUNNING:
                self.running.remove(seq)
                self._dropped.extend(self._executor_ids(seq))
            elif seq.status is not SeqStatus.FINISHING:  # (that one is freed and dropped)
                continue
            self._finish(seq, reason)
            outputs.append(self._output(seq, []))
        for seq_id in self.request_seqs.pop(request_id, []):
            del self.seqs[seq_id]
        return outputs

    def requeue_running(self, max_failures: int) -> list[SeqOutput]:
        """The executors lost their state (a rank restarted, or a step failed): the
        steps in flight are lost, and every running sequence goes back to the head of
        its queue, to be recomputed from its tokens so far (seeded sampling is keyed
        by position, so its output does not change). One caught in more than
        `max_failures` failures in a row finishes with ERROR: a request that crashes
        its executor must not crash it forever."""
        outputs = []
        finishing = [p.seq for planned in self._in_flight.values() for p in planned
                     if p.seq.status is SeqStatus.FINISHING]
        self.discard_in_flight()
        for seq in reversed(self.running + finishing):  # appendleft: they keep their order
            self.kv.free(seq.seq_id)
            self._dropped.append(seq.seq_id)
            seq.num_failures += 1
            seq.num_computed = 0
            seq.incarnation += 1
            if seq.num_failures > max_failures:
                seq.status = SeqStatus.FINISHED
                seq.finish_reason = FinishReason.ERROR
                outputs.append(self._output(seq, []))
                continue
            seq.status = SeqStatus.WAITING
            seq.num_preemptions += 1
            self.waiting.appendleft(seq)
        self.running = []
        for out in outputs:
            self._forget_if_done(out.request_id)
        return outputs

    def discard_in_flight(self) -> None:
        """The steps in flight will never report back."""
        for planned in self._in_flight.values():
            for p in planned:
                p.seq.num_pending = 0
        self._in_flight.clear()

    def has_dropped(self) -> bool:
        return bool(self._dropped)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- one step -----------------------------------------------------
    def schedule(self) -> StepPlan:
        self._step_id += 1
        plan = StepPlan(step_id=self._step_id, finished_seq_ids=self._dropped)
        self._dropped = []
        budget = self.config.max_num_batched_tokens
        # highest effective priority first: the tail is what preemption takes
        step = self._step_id
        if self.policy.priorities and len({s.priority for s in self.running}) > 1:
            self.running.sort(key=lambda s: (-self.waiting.effective_priority(s, step), s.order))
        else:  # one class: aging alone, which orders them as they arrived (cheaper)
            self.running.sort(key=_BY_ORDER)
        self._retire_finishing(plan)
        if self.policy.priorities:
            self._preempt_for_priority(plan, budget)
        is_preempting = False
        planned: list[PlannedSeq] = []
        spec = self.speculator
        default_k = spec.config.num_tokens
        tables, blocks, bs = self.kv.tables, self.kv.pool.blocks, self.kv.block_size
        scheduled = plan.scheduled
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            # (no speculation anywhere near it: nothing more to look at)
            may_speculate = default_k or seq.params.speculative_tokens
            if seq.num_pending and (seq.is_fork_pending
                                    or (may_speculate and spec.waits(seq))):
                i += 1  # its pending token forks it, or it drafts from it: wait for it
                continue
            num_computed = seq.num_computed
            num_known = seq.num_tokens + seq.num_pending
            num_new = min(num_known - num_computed, budget)
            if num_new <= 0:
                i += 1
                continue
            if num_new == 1 and not may_speculate:
                # the common decode token: when it writes into the last block of its
                # table and that block is its own, nothing is allocated or copied (what
                # allocate_slots would find, without building its answer)
                table = tables[seq.seq_id]
                if num_computed // bs == len(table) - 1 and blocks[table[-1]].ref_count == 1:
                    scheduled.append(ScheduledSequence(seq.seq_id, 1, len(table), []))
                    seq.num_computed = num_computed + 1
                    samples = num_computed + 1 == num_known
                    seq.num_pending += samples
                    planned.append(PlannedSeq(seq, seq.incarnation, 1, num_computed + 1, samples))
                    budget -= 1
                    i += 1
                    continue
            drafts = spec.drafts(seq, num_new, budget) if may_speculate else []
            num_new += len(drafts)
            alloc = self.kv.allocate_slots(seq.seq_id, seq.num_computed + num_new, seq.num_computed)
            while alloc is None:
                victim = self.running.pop()
                self._preempt(victim, plan)
                is_preempting = True
                if victim is seq:
                    break
                alloc = self.kv.allocate_slots(seq.seq_id, seq.num_computed + num_new,
                                               seq.num_computed)
            if alloc is None:
                break
            plan.scheduled.append(ScheduledSequence(seq.seq_id, num_new, alloc.num_kept_blocks,
                                                    alloc.new_block_ids, drafts))
            plan.block_copies.extend(alloc.copies)
            self._advance(planned, seq, num_new, len(drafts))
            budget -= num_new
            i += 1
        while (not is_preempting and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            if not self._admit(self.waiting.best(step), budget, plan, planned):
                break
            budget -= plan.scheduled[-1].num_new_tokens
        if planned:
            self._in_flight[plan.step_id] = planned
        return plan

    def _advance(self, planned: list[PlannedSeq], seq: Sequence, num_new: int,
                 num_drafts: int = 0) -> None:
        """Advance `seq` as if this step had run: the next plan builds on it (its
        drafts count once the result says which were kept)."""
        seq.num_computed += num_new - num_drafts
        samples = seq.num_computed == seq.num_tokens + seq.num_pending
        if samples:
            seq.num_pending += 1
        planned.append(PlannedSeq(seq, seq.incarnation, num_new, seq.num_computed, samples,
                                num_drafts))

    def _retire_finishing(self, plan: StepPlan) -> None:
        """Sequences whose pending token is their last (by length) give up their slot
        and blocks now, not a step late: the step in flight that samples it runs
        before anything this plan puts in those blocks. Their full blocks are cached
        now, for the same reason."""
        max_len = self.config.max_model_len
        retiring = [s for s in self.running  # (pending tokens ending them by length)
                    if s.num_pending
                    and (len(s.output_token_ids) + s.num_pending >= s.params.max_tokens
                         or s.num_tokens + s.num_pending >= max_len)
                    and not s.is_fork_pending]
        for seq in retiring:
            p = next(p for step_id in sorted(self._in_flight, reverse=True)
                     for p in self._in_flight[step_id] if p.seq is seq and p.samples)
            self.kv.cache_blocks(seq.seq_id, seq.token_ids, p.num_computed, p.num_new_tokens,
                                 seq.salt)
            self.kv.free(seq.seq_id)
            self.running.remove(seq)
            seq.status = SeqStatus.FINISHING
            plan.finished_seq_ids.append(seq.seq_id)

    def _watermark_blocks(self) -> int:
        """Blocks a new request must leave free while others run (none when idle, so
        any request that fits the cache at all can start)."""
        if not self.running:
            return 0
        return int(self.policy.kv_watermark * self.kv.pool.num_blocks)

    def _start(self, seq: Sequence, budget: int) -> tuple[list[int], int, int]:
        """(prefix-cache hits, tokens computed in its first step, new blocks that takes)."""
        hits = self.kv.find_cached_prefix(seq.token_ids, seq.salt)
        num_hit = len(hits) * self.kv.block_size
        num_new = min(seq.num_tokens - num_hit, budget)
        return hits, num_new, -(-(num_hit + num_new) // self.kv.block_size) - len(hits)

    def _preempt_for_priority(self, plan: StepPlan, budget: int) -> None:
        """A waiting request of a higher class than some running ones, short of memory
        or of a running slot: preempt lower-class sequences (lowest first) to make room,
        before any of them is scheduled in this step."""
        cand = self.waiting.best(self._step_id)
        if cand is None or not self.running:
            return
        weight = self.policy.weight(cand.priority)
        victims = [s for s in self.running if self.policy.weight(s.priority) < weight]
        if not victims:
            return
        need = self._start(cand, budget)[2] + self._watermark_blocks()
        short_blocks = need - self.kv.pool.num_free
        short_slots = len(self.running) + 1 - self.config.max_num_seqs
        if short_blocks <= 0 and short_slots <= 0:
            return
        # only when the victims can cover it: never preempt in vain
        freeable = sum(len(self.kv.tables.get(v.seq_id, ())) for v in victims)
        if freeable < short_blocks or len(victims) < short_slots:
            return
        while (short_blocks > 0 or short_slots > 0) and victims:
            victim = victims.pop()  # running is sorted: the tail is the lowest priority
            short_blocks -= len(self.kv.tables.get(victim.seq_id, ()))
            short_slots -= 1
            self.running.remove(victim)
            self._preempt(victim, plan)

    def _admit(self, seq: Sequence, budget: int, plan: StepPlan, planned: list[PlannedSeq]) -> bool:
        hits, num_new, num_blocks = self._start(seq, budget)
        num_hit = len(hits) * self.kv.block_size
        watermark = self._watermark_blocks()
        if watermark and num_blocks > self.kv.pool.num_free - watermark:
            return False
        alloc = self.kv.allocate_slots(seq.seq_id, num_hit + num_new, num_hit, hits)
        if alloc is None:
            return False
        self.kv.record_lookup(seq.num_tokens, num_hit)
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = num_hit
        self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        seq.num_computed = num_hit
        self.running.append(seq)
        block_ids = list(self.kv.block_ids(seq.seq_id))
        plan.new.append(NewSequence(
            seq_id=seq.seq_id, token_ids=list(seq.token_ids),
            num_prompt_tokens=seq.num_prompt_tokens,
            params=seq.params, index=seq.index, num_computed=num_hit,
            block_ids=block_ids,
        ))
        plan.scheduled.append(ScheduledSequence(seq.seq_id, num_new, len(block_ids), []))
        self._advance(planned, seq, num_new)
        return True

    @staticmethod
    def _executor_ids(seq: Sequence) -> list[str]:
        """What the executor holds for `seq`: its forks too, when the step in flight
        forks it (the executor makes them before the scheduler hears of them)."""
        if seq.num_pending and seq.is_fork_pending:
            return [sequence_id(seq.request_id, i) for i in range(seq.params.n)]
        return [seq.seq_id]

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        plan.finished_seq_ids.extend(self._executor_ids(seq))  # before num_pending resets
        self.kv.free(seq.seq_id)
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        seq.num_pending = 0  # a token sampled in flight is recomputed on resume (same value)
        seq.incarnation += 1
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
