"""The step's inputs built with vectorised code and staged in one copy: the
metadata says, token by token, what a plain per-token reading of the block
tables says, for decode-only, prefill-only and mixed steps, with and without
a sliding window, for both backends' layouts."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmesh.services.executor.attention import SeqSlice, build_metadata
from llmesh.services.executor.staging import Staging

BS = 4


@st.composite
def steps(draw):
    """Single-query rows (longest context first), then prefill chunks; each
    sequence's block table holds distinct ids, sometimes more than it needs."""
    pool = iter(draw(st.permutations(range(400))))
    singles = sorted(draw(st.lists(st.integers(0, 60), max_size=12)), reverse=True)
    chunks = draw(st.lists(st.tuples(st.integers(0, 40), st.integers(2, 30)), max_size=4))
    seqs = []
    for computed, new in [(c, 1) for c in singles] + chunks:
        need = -(-(computed + new) // BS) + draw(st.integers(0, 2))
        seqs.append(SeqSlice(computed, new, [next(pool) for _ in range(need)]))
    return seqs


def _visible(ctx_len: int, q_pos: int, window):
    return [k <= q_pos and (window is None or k > q_pos - window) for k in range(ctx_len)]


@settings(max_examples=150, deadline=None)
@given(seqs=steps(), window=st.sampled_from([None, 5]), tables=st.booleans(), pack=st.booleans())
def test_metadata_matches_a_per_token_reading_of_the_tables(seqs, window, tables, pack):
    meta = build_metadata(seqs, BS, window, torch.device("cpu"), with_block_tables=tables,
                          staging=Staging("cpu", pack=pack))
    positions = [p for s in seqs for p in range(s.num_computed, s.num_computed + s.num_new)]
    slots = [s.block_ids[p // BS] * BS + p % BS
             for s in seqs for p in range(s.num_computed, s.num_computed + s.num_new)]
    assert meta.positions.tolist() == positions
    assert meta.slot_mapping.tolist() == slots
    singles = [s for s in seqs if s.num_new == 1]
    assert meta.num_single == len(singles)
    if singles and tables:
        ctx = [s.num_computed + 1 for s in singles]
        assert meta.single_context_lens.dtype == torch.int32
        assert meta.single_context_lens.tolist() == ctx and meta.max_single_context == max(ctx)
        for row, s, c in zip(meta.single_block_tables.tolist(), singles, ctx):
            assert row[:-(-c // BS)] == s.block_ids[:-(-c // BS)]
        assert not meta.groups
    elif singles:
        assert sum(g.num_rows for g in meta.groups) == len(singles)
        for g in meta.groups:
            ids = g.block_ids.view(g.num_rows, g.max_blocks)
            for r in range(g.num_rows):
                s = singles[g.row_start + r]
                ctx = s.num_computed + 1
                keys = ids[r].repeat_interleave(BS) * BS + torch.arange(g.max_blocks * BS) % BS
                seen = g.mask[r, 0, 0].tolist()
                assert seen == _visible(g.max_blocks * BS, ctx - 1, window)
                want = [s.block_ids[k // BS] * BS + k % BS for k in range(ctx)]
                assert keys[torch.tensor(seen)].tolist() == [w for w, v in zip(
                    want, _visible(ctx, ctx - 1, window)) if v]
    chunks = [s for s in seqs if s.num_new != 1]
    assert len(meta.prefills) == len(chunks)
    row = len(singles)
    for c, s in zip(meta.prefills, chunks):
        ctx = s.num_computed + s.num_new
        assert (c.q_start, c.q_len, c.ctx_len) == (row, s.num_new, ctx)
        assert c.block_ids.tolist() == s.block_ids[:-(-ctx // BS)]
        mask = c.mask.tolist() if c.mask is not None else \
            [[k <= q for k in range(ctx)] for q in range(s.num_new)]  # (plain causal)
        assert mask == [_visible(ctx, q, window) for q in range(s.num_computed, ctx)]
        row += s.num_new


@pytest.mark.parametrize("pack", [False, True])
def test_staging_gives_each_array_back_with_its_shape_and_dtype(pack):
    """Plain (the CPU's zero-copy path) and packed into one slab copied once (a
    GPU's path, here without pinning): every array comes back as it went in,
    across flushes that reuse the slabs."""
    staging = Staging("cpu", pack=pack)
    rng = np.random.default_rng(0)
    kept = []
    for step in range(5):
        arrays = [rng.integers(-2 ** 40, 2 ** 40, size=(2, 3)),
                  rng.integers(0, 100, size=7).astype(np.int32),
                  rng.random(5).astype(np.float32), rng.random(3),
                  rng.random(9) > 0.5, np.zeros(0, dtype=np.int64)]
        staged = [staging.put(a) for a in arrays]
        assert staged[0].tensor is None  # (until the flush)
        staging.flush()
        kept.append((arrays, staged))
    for arrays, staged in kept:  # (earlier steps' tensors are not overwritten)
        for a, s in zip(arrays, staged):
            assert s.tensor.dtype == torch.from_numpy(a).dtype
            assert s.tensor.shape == a.shape and np.array_equal(s.tensor.numpy(), a)
    assert staging.num_copies == (5 if pack else 0)
    with pytest.raises(TypeError):
        staging.put(np.zeros(2, dtype=np.float16))


def test_plans_and_results_cross_the_wire_unchanged():
    """The packed wire form (columns, not a message per sequence) gives back the
    same plan and result: blocks per sequence, forks' several tokens, logprobs."""
    from llmesh.v1 import executor_pb2
    from llmesh.services.common import convert
    from llmesh.services.common.step_plan import (ScheduledSequence, StepPlan, StepResult,
                                                  TokenLogprobs)
    plan = StepPlan(step_id=7, scheduled=[
        ScheduledSequence("a", 1, 3, []), ScheduledSequence("b", 17, 0, [4, 5]),
        ScheduledSequence("c#1", 1, 2, [9]), ScheduledSequence("d", 1, 1, [])],
        finished_seq_ids=["x"], block_copies=[(1, 2)], traceparent="00-ab-cd-01")
    wire = executor_pb2.StepPlan.FromString(convert.plan_to_proto(plan).SerializeToString())
    assert convert.plan_from_proto(wire) == plan
    for sampled, logprobs in [({"a": [3], "b": [4]}, {}),
                              ({"a": [3, 8, 9], "b": [4]},
                               {"b": [TokenLogprobs(4, -0.5, [4, 5], [-0.5, -1.25])]})]:
        result = StepResult(step_id=7, forward_s=0.5, num_kv_blocks=64, kv_epoch=11)
        result.sampled, result.logprobs = sampled, logprobs
        back = convert.result_from_proto(executor_pb2.StepResult.FromString(
            convert.result_to_proto(result).SerializeToString()))
        assert back == result
