"""The kvcache index follows a scheduler's block pool from its events alone: after
any sequence of operations, lost batches, scheduler restarts and index restarts,
it holds exactly the pool's cached blocks (hypothesis)."""
from hypothesis import given, settings, strategies as st

from llmesh.services.common.block_hash import prefix_hashes
from llmesh.services.kvcache.index import PrefixIndex
from llmesh.services.scheduler.kv_events import KVEventLog
from llmesh.services.scheduler.kv_manager import KVCacheManager

BLOCK = 4


class Replica:
    """A scheduler's pool, its event log, and the publisher's protocol: a snapshot
    first and whenever the index refuses a batch."""

    def __init__(self):
        self.start()

    def start(self):  # a (re)started scheduler: a new pool and a new epoch
        self.log = KVEventLog()
        self.kv = KVCacheManager(num_blocks=16, block_size=BLOCK, on_event=self.log.record)
        self.seqs: dict[str, list[int]] = {}
        self.n = 0
        self.needs_snapshot = True
        self.has_lost = False  # a batch went missing and no later one has shown the gap yet

    def publish(self, index: PrefixIndex, name: str, lose: bool = False):
        if self.needs_snapshot or self.log.needs_snapshot:
            index.load_snapshot(name, self.log.snapshot(self.kv.pool))
            self.needs_snapshot = self.has_lost = False
        batch = self.log.drain()
        if batch is None:
            return
        if lose:  # the next batch shows the gap
            self.has_lost = True
            return
        self.has_lost = False
        if index.apply(name, batch):
            self.needs_snapshot = True
            self.publish(index, name)


op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 24), st.integers(0, 2)),
    st.tuples(st.just("free"), st.integers(0, 20), st.just(0)),
    st.tuples(st.just("reset"), st.just(0), st.just(0)),
    st.tuples(st.just("restart_scheduler"), st.just(0), st.just(0)),
    st.tuples(st.just("restart_index"), st.just(0), st.just(0)),
    st.tuples(st.just("lose_batch"), st.just(0), st.just(0)),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=60))
def test_index_equals_the_pool_after_any_history(ops):
    replica, index = Replica(), PrefixIndex()
    for kind, a, b in ops:
        lose = False
        if kind == "add":  # a prompt from one of three families, so prefixes are shared
            tokens = [b * 100 + i for i in range(a)]
            sid = f"s{replica.n}"
            replica.n += 1
            hits = replica.kv.find_cached_prefix(tokens)
            if replica.kv.allocate_slots(sid, len(tokens), len(hits) * BLOCK, hits) is not None:
                replica.kv.cache_blocks(sid, tokens, len(tokens), len(tokens) - len(hits) * BLOCK)
                replica.seqs[sid] = tokens
        elif kind == "free" and replica.seqs:
            sid = sorted(replica.seqs)[a % len(replica.seqs)]
            replica.kv.free(sid)
            del replica.seqs[sid]
        elif kind == "reset":
            for sid in list(replica.seqs):
                replica.kv.free(sid)
            replica.seqs.clear()
            replica.kv.reset_prefix_cache()
        elif kind == "restart_scheduler":
            replica.start()
        elif kind == "restart_index":
            index = PrefixIndex()
            replica.needs_snapshot = True  # a new connection starts with a snapshot
        elif kind == "lose_batch":
            lose = True
        replica.publish(index, "r0", lose)
        if not replica.has_lost:
            assert dict(replica.kv.pool.cached_blocks()) == index.replicas["r0"].blocks
        replica.kv.pool.check_invariants()


def test_match_counts_leading_blocks_per_replica_and_salt():
    index, logs = PrefixIndex(), {}
    for name, tokens in (("a", list(range(12))), ("b", list(range(8)) + [99, 99, 99, 99])):
        log = logs[name] = KVEventLog()
        kv = KVCacheManager(num_blocks=8, block_size=BLOCK, on_event=log.record)
        index.load_snapshot(name, log.snapshot(kv.pool))
        kv.allocate_slots("s", len(tokens), 0)
        kv.cache_blocks("s", tokens, len(tokens), len(tokens), salt="t1")
        assert index.apply(name, log.drain()) == ""
    assert index.match(list(range(12)) + [5], "t1") == {"a": 3, "b": 2}
    assert index.match(list(range(12)), "t2") == {"a": 0, "b": 0}  # another tenant's salt
    assert index.match([7] + list(range(11)), "t1") == {"a": 0, "b": 0}  # chained: no hit
    assert prefix_hashes(list(range(12)), BLOCK, "t1")[0] in index.replicas["a"].blocks


def test_a_gap_or_a_new_epoch_marks_the_replica_stale_until_a_snapshot():
    index, log = PrefixIndex(), KVEventLog()
    kv = KVCacheManager(num_blocks=3, block_size=BLOCK, on_event=log.record)
    index.load_snapshot("r", log.snapshot(kv.pool))
    kv.allocate_slots("s", 8, 0)
    kv.cache_blocks("s", list(range(8)), 8, 8)
    lost = log.drain()
    kv.free("s")
    kv.allocate_slots("t", 12, 0)  # evicts: REMOVED events after the lost STOREs
    assert "gap" in index.apply("r", log.drain())
    assert index.match(list(range(8)), "") == {"r": 0} and not index.replicas["r"].is_synced
    assert index.apply("r", lost) == "no snapshot yet"
    index.load_snapshot("r", log.snapshot(kv.pool))
    assert index.replicas["r"].blocks == dict(kv.pool.cached_blocks())
    other = KVEventLog()
    other.record("stored", b"x" * 16, b"")
    assert "epoch" in index.apply("r", other.drain())
