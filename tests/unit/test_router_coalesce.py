"""A client stream that fell behind catches up in fewer responses, losing nothing."""
from collections import deque

from llmesh.v1 import common_pb2, scheduler_pb2
from llmesh.services.router.dispatch import coalesce as _coalesce


def _d(index, tokens, text, finish=0, **kw):
    return scheduler_pb2.SeqDelta(request_id="r", index=index, new_token_ids=tokens, text=text,
                                  finish_reason=finish, **kw)


def test_waiting_deltas_of_one_sequence_join_up_to_its_last():
    last = _d(0, [4], "d", common_pb2.FINISH_REASON_LENGTH,
              usage=common_pb2.Usage(completion_tokens=4))
    pending = deque([_d(0, [1], "a"), _d(0, [2], "b"), _d(1, [9], "x"), _d(0, [3], "c"), last,
                     _d(0, [5], "late")])
    out = []
    while pending:
        out.append(_coalesce(pending))
    assert [(d.index, list(d.new_token_ids), d.text) for d in out] == [
        (0, [1, 2], "ab"), (1, [9], "x"), (0, [3, 4], "cd"), (0, [5], "late")]
    assert out[2].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert out[2].usage.completion_tokens == 4 and not out[0].finish_reason


def test_errors_and_lost_replicas_are_never_merged():
    err = scheduler_pb2.SeqDelta(request_id="r", error="full", error_code="RESOURCE_EXHAUSTED")
    pending = deque([_d(0, [1], "a"), err, "replica lost", _d(0, [2], "b")])
    assert list(_coalesce(pending).new_token_ids) == [1]
    assert _coalesce(pending) is err
    assert _coalesce(pending) == "replica lost"
    assert _coalesce(pending).text == "b"
