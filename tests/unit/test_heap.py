"""Start-up objects leave the collector's way (services/common/heap.py): a serving
process after a full collection, an in-process engine after a young one only,
given back when it closes."""
import contextlib
import gc
import weakref

from llmesh.services.common.heap import freeze_startup, thaw
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.engine.engine import Engine, EngineConfig


@contextlib.contextmanager
def collections():
    """The generations of the collections made inside (automatic ones held off, so
    that only what the code asks for is seen)."""
    seen: list[int] = []

    def record(phase, info):
        if phase == "start":
            seen.append(info["generation"])
    was_enabled = gc.isenabled()
    gc.disable()
    gc.callbacks.append(record)
    try:
        yield seen
    finally:
        gc.callbacks.remove(record)
        if was_enabled:
            gc.enable()


def test_a_serving_process_collects_everything_then_freezes():
    with collections() as seen:
        freeze_startup()
    try:
        assert seen == [2] and gc.get_freeze_count() > 0
    finally:
        thaw()
    assert gc.get_freeze_count() == 0


def test_an_engine_freezes_after_a_young_collection_and_thaws_when_closed(tiny_model):
    with collections() as seen:
        engine = Engine(tiny_model, EngineConfig(num_kv_blocks=16, block_size=16))
    try:
        # no full pass over the caller's heap: only the young generations
        assert seen == [1]
        assert gc.get_freeze_count() > 0
    finally:
        engine.close()
    assert gc.get_freeze_count() == 0


def _used_engine(model):
    engine = Engine(model, EngineConfig(num_kv_blocks=16, block_size=16))
    engine.generate([[0, 5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True))
    return engine


def test_a_dropped_engine_is_freed_without_the_collector_so_the_next_cannot_freeze_it(
        tiny_model):
    """The young-only freeze never looks at old garbage: an engine in a reference
    cycle would keep its KV cache frozen by the next engine. Closed or only dropped,
    an engine goes by reference counting alone."""
    with collections():  # (no collection at all, automatic or not, may free it)
        closed = _used_engine(tiny_model)
        closed_kv = weakref.ref(closed.runner.kv_caches[0][0])
        closed.close()
        del closed
        dropped = _used_engine(tiny_model)
        dropped_kv = weakref.ref(dropped.runner.kv_caches[0][0])
        del dropped
        assert closed_kv() is None and dropped_kv() is None
        following = _used_engine(tiny_model)
        following.close()
    assert gc.get_freeze_count() == 0
