"""The scheduler's short path for a plain decode token (services/scheduler/scheduler.py)
plans exactly what `allocate_slots` would: nothing new while the token writes into
the last block of its table and that block is its own, a new block when it starts
one, and a copy first when the block it writes is shared (after a fork)."""
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.common.step_plan import StepResult
from llmesh.services.scheduler.kv_manager import KVCacheManager
from llmesh.services.scheduler.scheduler import Scheduler, SchedulerConfig
from llmesh.services.scheduler.sequence import Sequence

BLOCK = 16


def _scheduler() -> Scheduler:
    return Scheduler(SchedulerConfig(max_model_len=256, max_num_batched_tokens=256, max_num_seqs=8),
                     KVCacheManager(32, BLOCK))


def _add(sched: Scheduler, request_id: str, num_prompt: int, **params) -> None:
    sched.add(Sequence(seq_id=request_id, request_id=request_id, index=0,
                       prompt_token_ids=list(range(1, num_prompt + 1)),
                       params=SamplingParams(max_tokens=40, ignore_eos=True, **params).with_seed(),
                       arrival_s=0.0))


def _step(sched: Scheduler, tokens_per_seq: int = 1):
    """One serial step: plan, then a result sampling token 7 (n of them for a fork)."""
    plan = sched.schedule()
    sched.update(plan, StepResult(step_id=plan.step_id, sampled={
        s.seq_id: [7] * tokens_per_seq for s in plan.scheduled}))
    return plan


def test_a_decode_token_in_its_own_last_block_changes_no_table():
    sched = _scheduler()
    _add(sched, "a", 20)  # two blocks, the second partly filled
    _step(sched)  # the prompt, and its first token
    table = list(sched.kv.block_ids("a"))
    for _ in range(BLOCK * 2 - 20):  # positions 20 .. 31: the rest of its second block
        plan = _step(sched)
        [s] = plan.scheduled
        assert (s.num_new_tokens, s.num_kept_blocks, s.new_block_ids) == (1, 2, [])
        assert plan.block_copies == []
    assert sched.kv.block_ids("a") == table
    # position 32 is the first of a third block: allocated on the general path
    plan = _step(sched)
    [s] = plan.scheduled
    assert s.num_kept_blocks == 2 and len(s.new_block_ids) == 1
    assert sched.kv.block_ids("a") == table + s.new_block_ids
    sched.kv.pool.check_invariants()


def test_a_decode_token_into_a_shared_block_is_copied_first():
    sched = _scheduler()
    _add(sched, "r", 20, n=2, temperature=1.0)
    _step(sched, tokens_per_seq=2)  # the prompt; its two samples fork it
    parent, child = sched.kv.block_ids("r"), sched.kv.block_ids("r#1")
    assert parent == child  # both blocks shared, the second partly filled
    plan = _step(sched)
    assert len(plan.scheduled) == 2
    # the first to write the shared partial block copies it; the other then owns the
    # original alone and writes it in place
    assert len(plan.block_copies) == 1
    src, dst = plan.block_copies[0]
    first, second = plan.scheduled
    assert (first.num_kept_blocks, first.new_block_ids) == (1, [dst])
    assert (second.num_kept_blocks, second.new_block_ids) == (2, [])
    tables = {"r": sched.kv.block_ids("r"), "r#1": sched.kv.block_ids("r#1")}
    assert tables[first.seq_id] == [parent[0], dst] and tables[second.seq_id] == [parent[0], src]
    sched.kv.pool.check_invariants()
