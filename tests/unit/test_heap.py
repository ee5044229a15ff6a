"""Start-up objects leave the collector's way (services/common/heap.py): a serving
process after a full collection, an in-process engine after a young one only,
given back when it closes."""
import contextlib
import gc

from llmesh.services.common.heap import freeze_startup, thaw
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
