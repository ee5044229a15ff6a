"""Proto <-> domain conversion, done once at each service boundary."""
from __future__ import annotations

from llmesh.v1 import common_pb2, executor_pb2
from services.common.sampling_params import SamplingParams
from services.common.step_plan import (NewSequence, ScheduledSequence, StepPlan, StepResult,
                                       TokenLogprobs)

_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "seed", "logprobs", "n")


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Unset optional fields keep the domain defaults; float32 wire values are
    rounded back to the nearest short decimal so 0.9 stays 0.9."""
    kwargs = {}
    for name in _SAMPLING_FIELDS:
        if msg.HasField(name):
            value = getattr(msg, name)
            kwargs[name] = float(f"{value:.7g}") if isinstance(value, float) else value
    return SamplingParams(stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
                          repetition_max_ngram=msg.repetition_max_ngram,
                          repetition_min_repeats=msg.repetition_min_repeats, **kwargs)


def sampling_to_proto(p: SamplingParams, stop: list[str] = ()) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
        min_p=p.min_p, repetition_penalty=p.repetition_penalty,
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
        stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos, n=p.n, stop=list(stop),
        repetition_max_ngram=p.repetition_max_ngram,
        repetition_min_repeats=p.repetition_min_repeats)
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def logprob_to_proto(lp: TokenLogprobs) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top_ids=lp.top_ids,
                                   top_logprobs=lp.top_logprobs)


def logprob_from_proto(msg: common_pb2.TokenLogprob) -> TokenLogprobs:
    return TokenLogprobs(msg.token_id, msg.logprob, list(msg.top_ids), list(msg.top_logprobs))


def plan_to_proto(plan: StepPlan) -> executor_pb2.StepPlan:
    return executor_pb2.StepPlan(
        step_id=plan.step_id,
        new=[executor_pb2.NewSequence(
            seq_id=n.seq_id, token_ids=n.token_ids, num_prompt_tokens=n.num_prompt_tokens,
            sampling=sampling_to_proto(n.params), seed=n.seed, index=n.index,
            num_computed=n.num_computed, block_ids=n.block_ids) for n in plan.new],
        scheduled=[executor_pb2.ScheduledSequence(
            seq_id=s.seq_id, num_new_tokens=s.num_new_tokens, num_kept_blocks=s.num_kept_blocks,
            new_block_ids=s.new_block_ids) for s in plan.scheduled],
        finished_seq_ids=plan.finished_seq_ids,
        block_copies=[executor_pb2.BlockCopy(src=s, dst=d) for s, d in plan.block_copies],
        traceparent=plan.traceparent)


def plan_from_proto(msg: executor_pb2.StepPlan) -> StepPlan:
    return StepPlan(
        step_id=msg.step_id,
        new=[NewSequence(seq_id=n.seq_id, token_ids=list(n.token_ids),
                         num_prompt_tokens=n.num_prompt_tokens,
                         params=sampling_from_proto(n.sampling), seed=n.seed, index=n.index,
                         num_computed=n.num_computed, block_ids=list(n.block_ids))
             for n in msg.new],
        scheduled=[ScheduledSequence(s.seq_id, s.num_new_tokens, s.num_kept_blocks,
                                     list(s.new_block_ids)) for s in msg.scheduled],
        finished_seq_ids=list(msg.finished_seq_ids),
        block_copies=[(c.src, c.dst) for c in msg.block_copies],
        traceparent=msg.traceparent)


def result_to_proto(result: StepResult) -> executor_pb2.StepResult:
    return executor_pb2.StepResult(
        step_id=result.step_id, forward_s=result.forward_s, sample_s=result.sample_s,
        comm_s=result.comm_s, num_kv_blocks=result.num_kv_blocks, kv_epoch=result.kv_epoch,
        sampled=[executor_pb2.SampledTokens(
            seq_id=seq_id, token_ids=tokens,
            logprobs=[logprob_to_proto(lp) for lp in result.logprobs.get(seq_id, [])])
            for seq_id, tokens in result.sampled.items()])


def result_from_proto(msg: executor_pb2.StepResult) -> StepResult:
    result = StepResult(step_id=msg.step_id, forward_s=msg.forward_s, sample_s=msg.sample_s,
                        comm_s=msg.comm_s, num_kv_blocks=msg.num_kv_blocks,
                        kv_epoch=msg.kv_epoch)
    for s in msg.sampled:
        result.sampled[s.seq_id] = list(s.token_ids)
        if s.logprobs:
            result.logprobs[s.seq_id] = [logprob_from_proto(lp) for lp in s.logprobs]
    return result


PRIORITY_NAMES = {common_pb2.PRIORITY_INTERACTIVE: "interactive",
                  common_pb2.PRIORITY_STANDARD: "standard", common_pb2.PRIORITY_BATCH: "batch"}
PRIORITY_VALUES = {name: value for value, name in PRIORITY_NAMES.items()}


def priority_from_proto(value: int, default: str = "standard") -> str:
    """The class name of a Priority enum value (UNSPECIFIED: `default`)."""
    return PRIORITY_NAMES.get(value, default)
