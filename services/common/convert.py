"""Proto <-> domain conversion, done once at each service boundary.

The public `SamplingParams` message becomes the domain `SamplingParams` once,
at the router (`sampling_from_public`). Inside the mesh the domain value
travels as `SamplingConfig` (`sampling_to_wire` / `sampling_from_wire`), whose
doubles carry it exactly, so no hop rounds or re-validates it. Every declared
parameter (services/common/sampling_params.py) is carried field for field by
name; only structured output has its own shape in each message.
"""
from __future__ import annotations

import itertools

from llmesh.v1 import common_pb2, engine_pb2, executor_pb2, kvcache_pb2
from llmesh.services.common.errors import InvalidRequestError
from llmesh.services.common.finish_reason import FinishReason
from llmesh.services.common.kv_events import CLEARED, REMOVED, STORED, EventBatch, KVEvent, Snapshot
from llmesh.services.common.grammar_spec import GrammarSpec
from llmesh.services.common.sampling_params import PARAMS, SamplingParams
from llmesh.services.common.step_plan import (NewSequence, ScheduledSequence, StepPlan, StepResult,
                                       TokenLogprobs)

_CARRIED = tuple(name for name in PARAMS if name != "grammar")  # field for field, by name


def _params_of(msg) -> dict:
    """The declared sampling parameters a message carries: an optional field left
    unset keeps the domain default; repeated fields become tuples; float32 values
    (the public message's) are rounded to the nearest short decimal, so 0.9 stays 0.9."""
    fields = msg.DESCRIPTOR.fields_by_name
    out = {}
    for name in _CARRIED:
        f = fields[name]
        if f.is_repeated:
            out[name] = tuple(getattr(msg, name))
        elif not f.has_presence or msg.HasField(name):
            value = getattr(msg, name)
            out[name] = float(f"{value:.7g}") if f.type == f.TYPE_FLOAT else value
    return out


def _with_params(msg, p: SamplingParams):
    """`msg` with every declared parameter of `p` set (None: left unset)."""
    fields = msg.DESCRIPTOR.fields_by_name
    for name in _CARRIED:
        value = getattr(p, name)
        if value is None:
            continue
        if fields[name].is_repeated:
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    return msg


def sampling_from_public(msg: common_pb2.SamplingParams) -> SamplingParams:
    """The client's parameters (unset optional fields keep the domain defaults)."""
    grammar = None
    kind = msg.structured.WhichOneof("kind") if msg.HasField("structured") else None
    if kind is not None:
        source = "" if kind == "json_object" else getattr(msg.structured, kind)
        grammar = GrammarSpec(kind, source)
    return SamplingParams(grammar=grammar, **_params_of(msg))


def sampling_to_public(p: SamplingParams) -> common_pb2.SamplingParams:
    """The parameters as a client sends them (a dead letter's replay)."""
    msg = _with_params(common_pb2.SamplingParams(), p)
    if p.grammar is not None:
        if p.grammar.kind == "json_object":
            msg.structured.json_object = True
        else:
            setattr(msg.structured, p.grammar.kind, p.grammar.source)
    return msg


def sampling_to_wire(p: SamplingParams) -> engine_pb2.SamplingConfig:
    msg = _with_params(engine_pb2.SamplingConfig(), p)
    if p.grammar is not None:
        msg.grammar_kind, msg.grammar_source = p.grammar.kind, p.grammar.source
    return msg


def sampling_from_wire(msg: engine_pb2.SamplingConfig) -> SamplingParams:
    return SamplingParams(
        grammar=GrammarSpec(msg.grammar_kind, msg.grammar_source) if msg.grammar_kind else None,
        **_params_of(msg))


def logprob_to_proto(lp: TokenLogprobs) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top_ids=lp.top_ids,
                                   top_logprobs=lp.top_logprobs)


def logprob_from_proto(msg: common_pb2.TokenLogprob) -> TokenLogprobs:
    return TokenLogprobs(msg.token_id, msg.logprob, list(msg.top_ids), list(msg.top_logprobs))


def plan_to_proto(plan: StepPlan) -> executor_pb2.StepPlan:
    sched = plan.scheduled
    cols = executor_pb2.ScheduledColumns(
        seq_ids=[s.seq_id for s in sched], num_new_tokens=[s.num_new_tokens for s in sched],
        num_kept_blocks=[s.num_kept_blocks for s in sched],
        num_new_blocks=[len(s.new_block_ids) for s in sched],
        new_block_ids=[b for s in sched if s.new_block_ids for b in s.new_block_ids])
    if any(s.draft_token_ids for s in sched):
        cols.num_draft_tokens.extend(len(s.draft_token_ids) for s in sched)
        cols.draft_token_ids.extend(t for s in sched for t in s.draft_token_ids)
    return executor_pb2.StepPlan(
        step_id=plan.step_id,
        new=[executor_pb2.NewSequence(
            seq_id=n.seq_id, token_ids=n.token_ids, num_prompt_tokens=n.num_prompt_tokens,
            sampling=sampling_to_wire(n.params), index=n.index,
            num_computed=n.num_computed, block_ids=n.block_ids) for n in plan.new],
        scheduled=cols, finished_seq_ids=plan.finished_seq_ids,
        block_copies=[executor_pb2.BlockCopy(src=s, dst=d) for s, d in plan.block_copies],
        traceparent=plan.traceparent)


def plan_from_proto(msg: executor_pb2.StepPlan) -> StepPlan:
    c = msg.scheduled
    new_ids = list(c.new_block_ids)
    ends = list(itertools.accumulate(c.num_new_blocks))
    scheduled = [ScheduledSequence(seq_id, num_new, kept, new_ids[end - count:end])
                 for seq_id, num_new, kept, count, end in zip(
                     c.seq_ids, c.num_new_tokens, c.num_kept_blocks, c.num_new_blocks, ends)]
    if c.num_draft_tokens:
        drafts = list(c.draft_token_ids)
        for s, count, end in zip(scheduled, c.num_draft_tokens,
                                 itertools.accumulate(c.num_draft_tokens)):
            s.draft_token_ids = drafts[end - count:end]
    return StepPlan(
        step_id=msg.step_id,
        new=[NewSequence(seq_id=n.seq_id, token_ids=list(n.token_ids),
                         num_prompt_tokens=n.num_prompt_tokens,
                         params=sampling_from_wire(n.sampling), index=n.index,
                         num_computed=n.num_computed, block_ids=list(n.block_ids))
             for n in msg.new],
        scheduled=scheduled, finished_seq_ids=list(msg.finished_seq_ids),
        block_copies=[(c.src, c.dst) for c in msg.block_copies],
        traceparent=msg.traceparent)


def result_to_proto(result: StepResult) -> executor_pb2.StepResult:
    sampled = result.sampled
    if all(len(tokens) == 1 for tokens in sampled.values()):  # (no fork: one token each)
        cols = executor_pb2.SampledColumns(seq_ids=sampled, num_tokens=[1] * len(sampled),
                                           token_ids=[t for t, in sampled.values()])
    else:
        cols = executor_pb2.SampledColumns(
            seq_ids=sampled, num_tokens=[len(t) for t in sampled.values()],
            token_ids=[t for tokens in sampled.values() for t in tokens])
    return executor_pb2.StepResult(
        step_id=result.step_id, forward_s=result.forward_s, sample_s=result.sample_s,
        comm_s=result.comm_s, num_kv_blocks=result.num_kv_blocks, kv_epoch=result.kv_epoch,
        sampled=cols, logprobs=[executor_pb2.SeqLogprobs(
            seq_id=seq_id, logprobs=[logprob_to_proto(lp) for lp in lps])
            for seq_id, lps in result.logprobs.items()])


def result_from_proto(msg: executor_pb2.StepResult) -> StepResult:
    result = StepResult(step_id=msg.step_id, forward_s=msg.forward_s, sample_s=msg.sample_s,
                        comm_s=msg.comm_s, num_kv_blocks=msg.num_kv_blocks,
                        kv_epoch=msg.kv_epoch)
    c = msg.sampled
    tokens = list(c.token_ids)
    if len(tokens) == len(c.seq_ids):  # (one token each)
        result.sampled = {seq_id: [t] for seq_id, t in zip(c.seq_ids, tokens)}
    else:
        ends = itertools.accumulate(c.num_tokens)
        result.sampled = {seq_id: tokens[end - n:end]
                          for seq_id, n, end in zip(c.seq_ids, c.num_tokens, ends)}
    for s in msg.logprobs:
        result.logprobs[s.seq_id] = [logprob_from_proto(lp) for lp in s.logprobs]
    return result


# ---- enums ------------------------------------------------------------------
FINISH_TO_PROTO = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
    FinishReason.DEADLINE: common_pb2.FINISH_REASON_DEADLINE,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
    FinishReason.TOOL_CALLS: common_pb2.FINISH_REASON_TOOL_CALLS,
}
FINISH_NAMES = {value: (reason.value if reason else "none")
                for reason, value in FINISH_TO_PROTO.items()}

PRIORITY_NAMES = {common_pb2.PRIORITY_INTERACTIVE: "interactive",
                  common_pb2.PRIORITY_STANDARD: "standard", common_pb2.PRIORITY_BATCH: "batch"}
PRIORITY_VALUES = {name: value for value, name in PRIORITY_NAMES.items()}


def priority_from_proto(value: int, default: str = "standard") -> str:
    """The class name of a Priority enum value (UNSPECIFIED: `default`)."""
    return PRIORITY_NAMES.get(value, default)


# ---- KV events --------------------------------------------------------------
_KIND_TO_PROTO = {STORED: kvcache_pb2.KVEvent.KIND_STORED,
                  REMOVED: kvcache_pb2.KVEvent.KIND_REMOVED,
                  CLEARED: kvcache_pb2.KVEvent.KIND_CLEARED}
_KIND_FROM_PROTO = {v: k for k, v in _KIND_TO_PROTO.items()}


def batch_to_proto(batch: EventBatch) -> kvcache_pb2.EventBatch:
    return kvcache_pb2.EventBatch(
        epoch=batch.epoch, first_event_id=batch.first_event_id,
        events=[kvcache_pb2.KVEvent(kind=_KIND_TO_PROTO[e.kind], block_hash=e.block_hash,
                                    parent_hash=e.parent_hash) for e in batch.events])


def batch_from_proto(msg: kvcache_pb2.EventBatch) -> EventBatch:
    """Raises ValueError on an event kind it does not know."""
    events = []
    for e in msg.events:
        kind = _KIND_FROM_PROTO.get(e.kind)
        if kind is None:
            raise ValueError(f"unknown KV event kind {e.kind}")
        events.append(KVEvent(kind, e.block_hash, e.parent_hash))
    return EventBatch(msg.epoch, msg.first_event_id, events)


def snapshot_to_proto(snap: Snapshot) -> kvcache_pb2.Snapshot:
    return kvcache_pb2.Snapshot(
        epoch=snap.epoch, next_event_id=snap.next_event_id, block_size=snap.block_size,
        blocks=[kvcache_pb2.BlockRef(block_hash=h, parent_hash=p) for h, p in snap.blocks])


def snapshot_from_proto(msg: kvcache_pb2.Snapshot) -> Snapshot:
    return Snapshot(msg.epoch, msg.next_event_id, msg.block_size,
                    [(b.block_hash, b.parent_hash) for b in msg.blocks])


# ---- chat messages and tools (inference.proto ChatMessages) ---------------------
def _arguments(text: str):
    """A call's arguments for a chat template: the object (templates render it with
    `tojson`), or the text as it came when it is not JSON."""
    import json
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return text


def chat_from_proto(chat) -> tuple[list[dict], list[dict] | None]:
    """(the messages as chat templates take them, the tools to show the model: None
    without tools or with tool_choice "none")."""
    import json
    messages = []
    for m in chat.messages:
        msg = {"role": m.role, "content": m.content}
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.name, "arguments": _arguments(c.arguments)}} for c in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.name:
            msg["name"] = m.name
        messages.append(msg)
    if not chat.tools or chat.tool_choice == "none":
        return messages, None
    tools = []
    for i, t in enumerate(chat.tools):
        try:
            params = json.loads(t.parameters) if t.parameters else {"type": "object"}
        except json.JSONDecodeError:
            raise InvalidRequestError(f"tools[{i}].parameters", "is not JSON") from None
        tools.append({"type": "function", "function": {
            "name": t.name, **({"description": t.description} if t.description else {}),
            "parameters": params}})
    return messages, tools
