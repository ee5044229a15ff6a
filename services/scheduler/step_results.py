"""The scheduler's result side: a step's sampled tokens applied to its sequences.

`update` takes the steps in plan order. Per sequence planned in the step: its
pending token arrives (or, with drafts, the drafts it kept and the token after
them), its filled blocks are counted and full ones cached, its tenant is
charged, and the token is appended: its text (incremental detokenization and
stop strings, when the replica makes text) and whether it ends the sequence
(EOS, a stop id, max_tokens, a repetition, the context). A parent with n > 1
forks into its n sequences on its first sampled tokens. Each applied token is
one `SeqOutput`. A plain decode token takes a short path (no fork, no drafts,
one token): the bulk of a step at large batches.

`StepResults` is a part of `Scheduler` (services/scheduler/scheduler.py), whose
state it reads and changes: the running set, the steps in flight, the sequences
the executor must forget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmesh.services.common.finish_reason import FinishReason
from llmesh.services.common.sampling_params import ends_in_repetition
from llmesh.services.common.step_plan import StepPlan, StepResult, TokenLogprobs, sequence_id
from llmesh.services.scheduler.kv_manager import KVCacheManager
from llmesh.services.scheduler.policy import WaitQueue
from llmesh.services.scheduler.sequence import Sequence, SeqStatus
from llmesh.services.scheduler.speculation import Speculator

if TYPE_CHECKING:
    from llmesh.services.scheduler.scheduler import SchedulerConfig


@dataclass(slots=True)
class SeqOutput:
    """What one sequence produced in one step (tokens appended, maybe finished)."""

    request_id: str
    index: int
    new_token_ids: list[int]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    text: str = ""  # text of new_token_ids (when the replica makes text)
    num_draft_tokens: int = 0  # speculative decoding: the sequence's drafts so far ...
    num_accepted_tokens: int = 0  # ... and those kept


@dataclass(slots=True)
class PlannedSeq:
    """One sequence's part of a step in flight."""

    seq: Sequence
    incarnation: int
    num_new_tokens: int
    num_computed: int  # after this step (its drafts not counted)
    samples: bool
    num_drafts: int = 0


class StepResults:
    """The result side of `Scheduler` (a base class: the state is the scheduler's)."""

    config: SchedulerConfig
    kv: KVCacheManager
    waiting: WaitQueue
    running: list[Sequence]
    seqs: dict[str, Sequence]
    request_seqs: dict[str, list[str]]
    speculator: Speculator
    _dropped: list[str]
    _in_flight: dict[int, list[PlannedSeq]]

    def update(self, plan: StepPlan, result: StepResult) -> list[SeqOutput]:
        """Apply a step's sampled tokens (steps complete in plan order); returns
        per-sequence deltas."""
        outputs = []
        sampled, all_logprobs = result.sampled, result.logprobs
        cache_blocks, charge = self.kv.cache_blocks, self.waiting.charge
        running, finishing = SeqStatus.RUNNING, SeqStatus.FINISHING
        decoded: dict[str, int] = {}  # tenant -> tokens of plain decode steps (charged once)
        for p in self._in_flight.pop(plan.step_id, ()):
            seq = p.seq
            status = seq.status
            if (status is not running and status is not finishing) \
                    or seq.incarnation != p.incarnation:
                continue  # finished, aborted or preempted since it was planned
            if p.samples:
                seq.num_pending -= 1
            seq.num_failures = 0
            if p.num_drafts:
                tokens = sampled.get(seq.seq_id)
                if tokens:
                    outputs.append(self._verified(seq, p, tokens,
                                                  all_logprobs.get(seq.seq_id, [])))
                continue
            num_computed, num_new = p.num_computed, p.num_new_tokens
            is_finishing = status is finishing
            if not is_finishing:  # (a finishing one cached its blocks when it retired)
                cache_blocks(seq.seq_id, seq.token_ids, num_computed, num_new, seq.salt)
            tokens = sampled.get(seq.seq_id) if p.samples else None
            num_prompt = len(seq.prompt_token_ids)
            if num_new == 1 and num_computed > num_prompt and tokens and len(tokens) == 1:
                # (the common case: one decode token)
                decoded[seq.tenant] = decoded.get(seq.tenant, 0) + 1
                logprobs = all_logprobs.get(seq.seq_id, ()) if all_logprobs else ()
                outputs.append(self._append(seq, tokens[0], logprobs[:1], is_finishing))
                continue
            num_prompt_new = max(0, min(num_prompt, num_computed) - (num_computed - num_new))
            charge(seq.tenant, num_prompt_new, len(tokens) if tokens else 0)
            if not tokens:
                continue
            logprobs = all_logprobs.get(seq.seq_id, [])
            if len(tokens) == 1:
                outputs.append(self._append(seq, tokens[0], logprobs[:1], is_finishing))
                continue
            family = [seq] + [self._fork(seq, i) for i in range(1, len(tokens))]
            for j, (member, token) in enumerate(zip(family, tokens)):
                outputs.append(self._append(member, token, logprobs[j:j + 1], is_finishing))
        for tenant, num_tokens in decoded.items():
            charge(tenant, 0, num_tokens)
        for out in outputs:
            if out.finish_reason is not None:
                self._forget_if_done(out.request_id)
        return outputs

    def _verified(self, seq: Sequence, p: PlannedSeq, tokens: list[int], logprobs) -> SeqOutput:
        """A step with drafts: the executor kept len(tokens) - 1 of them, then sampled
        the token after; their KV counts now. The tokens are appended up to the first
        that ends the sequence (the rest are dropped, as plain decoding never made
        them)."""
        kept = len(tokens) - 1
        self.speculator.record(p.num_drafts, kept)
        seq.num_draft_tokens += p.num_drafts
        seq.num_accepted_tokens += kept
        computed = p.num_computed + kept
        seq.num_computed += kept
        self.kv.cache_blocks(seq.seq_id, seq.token_ids + tokens[:kept], computed,
                             p.num_new_tokens - (p.num_drafts - kept), seq.salt)
        out = None
        for j, token in enumerate(tokens):
            step = self._append(seq, token, logprobs[j:j + 1], False)
            if out is None:
                out = step
            else:
                out.new_token_ids += step.new_token_ids
                out.logprobs += step.logprobs
                out.text += step.text
                out.finish_reason, out.num_output_tokens = step.finish_reason, \
                    step.num_output_tokens
            if step.finish_reason is not None:
                break
        self.waiting.charge(seq.tenant, 0, len(out.new_token_ids))  # (what it kept)
        return out

    def _append(self, seq: Sequence, token: int, logprobs, is_finishing: bool) -> SeqOutput:
        """One sampled token: its text, and whether it ends the sequence."""
        seq.append_token(token)
        stream = seq.text
        if stream is None:
            text = ""
            reason = self._stop_reason(seq, token)
        else:
            text = stream.push([token])
            reason = FinishReason.STOP if stream.is_stopped else self._stop_reason(seq, token)
        if is_finishing:
            reason = reason or FinishReason.LENGTH
        if reason is not None:
            if stream is not None:
                text += stream.finish()
            if not is_finishing:
                self.running.remove(seq)
                self._dropped.append(seq.seq_id)
            self._finish(seq, reason)
        return self._output(seq, [token], logprobs, text)

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        child = Sequence(
            seq_id=sequence_id(parent.request_id, index), request_id=parent.request_id,
            index=index, prompt_token_ids=parent.prompt_token_ids, params=parent.params,
            arrival_s=parent.arrival_s, salt=parent.salt,
            tenant=parent.tenant, priority=parent.priority, arrival_step=parent.arrival_step,
            order=parent.order, num_computed=parent.num_computed, status=SeqStatus.RUNNING,
            text=parent.text.fresh() if parent.text is not None else None,
        )
        self.kv.fork(parent.seq_id, child.seq_id)
        self.seqs[child.seq_id] = child
        self.request_seqs[parent.request_id].append(child.seq_id)
        self.running.append(child)
        return child

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        if token in self.config.eos_token_ids and not p.ignore_eos:
            return FinishReason.STOP
        if token in p.stop_token_ids:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= p.max_tokens:
            return FinishReason.LENGTH
        if p.repetition_max_ngram and ends_in_repetition(
                seq.output_token_ids, p.repetition_max_ngram, p.repetition_min_repeats):
            return FinishReason.STOP
        if seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.kv.free(seq.seq_id)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def _forget_if_done(self, request_id: str) -> None:
        seq_ids = self.request_seqs.get(request_id, [])
        if all(self.seqs[s].status is SeqStatus.FINISHED for s in seq_ids):
            for s in seq_ids:
                del self.seqs[s]
            self.request_seqs.pop(request_id, None)

    def _output(self, seq: Sequence, tokens: list[int], logprobs=(), text: str = "") -> SeqOutput:
        return SeqOutput(seq.request_id, seq.index, tokens, seq.finish_reason,
                         len(seq.prompt_token_ids), len(seq.output_token_ids),
                         seq.num_cached_tokens, list(logprobs), text, seq.num_draft_tokens,
                         seq.num_accepted_tokens)
