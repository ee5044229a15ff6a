"""Block pool and KV manager invariants under random operation sequences (hypothesis)."""
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmesh.services.scheduler.block_pool import BlockPool
from llmesh.services.scheduler.kv_manager import KVCacheManager


def test_allocate_returns_none_when_full_and_changes_nothing():
    pool = BlockPool(4, 16)
    assert pool.allocate(3) is not None
    assert pool.allocate(2) is None
    assert pool.num_free == 1
    pool.check_invariants()


def test_lru_eviction_of_cached_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = [1, 2, 3, 4, 5]
    assert kv.allocate_slots("a", 5, 0) is not None  # 3 blocks, 2 full
    kv.cache_blocks("a", a, 5, 5)
    kv.free("a")  # freed blocks stay cached and findable
    assert len(kv.find_cached_prefix(a)) == 2
    assert kv.stats().num_used_blocks == 0
    # a's partial block (it caches nothing) is handed out first, then the never-used
    # one, then the freed cached ones (tail first)
    assert kv.allocate_slots("b", 2, 0).new_block_ids == [2]
    assert len(kv.find_cached_prefix(a)) == 2 and kv.pool.num_evictions == 0
    assert kv.allocate_slots("c", 2, 0).new_block_ids == [3]
    assert len(kv.find_cached_prefix(a)) == 2
    kv.allocate_slots("d", 2, 0)  # evicts a's second full block
    assert len(kv.find_cached_prefix(a)) == 1 and kv.pool.num_evictions == 1
    kv.pool.check_invariants()


def test_a_freed_block_that_caches_nothing_is_handed_out_before_cached_ones():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a, b = [1, 2, 3, 4], [7]
    kv.allocate_slots("a", 4, 0)
    kv.cache_blocks("a", a, 4, 4)  # two full blocks, cached
    kv.allocate_slots("b", 1, 0)
    kv.cache_blocks("b", b, 1, 1)  # one partial block: nothing to cache
    partial = kv.block_ids("b")[0]
    kv.free("a")
    kv.free("b")  # freed last, but it holds no prefix anyone can hit
    assert kv.allocate_slots("c", 2, 0).new_block_ids == [partial]
    assert len(kv.find_cached_prefix(a + [5])) == 2 and kv.pool.num_evictions == 0
    kv.allocate_slots("d", 2, 0)  # then the least recently freed cached block
    assert len(kv.find_cached_prefix(a + [5])) == 1 and kv.pool.num_evictions == 1
    kv.pool.check_invariants()


def test_prefix_hits_are_salted_and_chained():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    toks = [1, 2, 3, 4, 5]
    kv.allocate_slots("a", 5, 0)
    kv.cache_blocks("a", toks, 5, 5, salt="tenant-a")
    assert len(kv.find_cached_prefix(toks, "tenant-a")) == 2
    assert kv.find_cached_prefix(toks, "tenant-b") == []
    assert kv.find_cached_prefix([9, 9, 3, 4, 5], "tenant-a") == []  # chained: block 2 alone no hit
    assert len(kv.find_cached_prefix([1, 2, 7, 7, 7], "tenant-a")) == 1
    # the last token is always computed: a 4-token prompt hits at most 1 block
    assert len(kv.find_cached_prefix([1, 2, 3, 4], "tenant-a")) == 1


def test_copy_on_write_after_fork():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.allocate_slots("p", 6, 0)  # blocks: one full, one half
    kv.cache_blocks("p", list(range(6)), 6, 6)
    kv.fork("p", "c")
    assert kv.pool.num_used == 2
    alloc = kv.allocate_slots("c", 7, 6)  # c writes position 6 into the shared half block
    assert alloc.num_kept_blocks == 1 and len(alloc.copies) == 1
    src, dst = alloc.copies[0]
    assert src == kv.tables["p"][1] and dst == kv.tables["c"][1] and alloc.new_block_ids == [dst]
    assert kv.tables["c"][0] == kv.tables["p"][0]  # the full block stays shared
    alloc = kv.allocate_slots("p", 7, 6)  # p is now the only owner: no copy
    assert alloc.copies == [] and alloc.num_kept_blocks == 2
    kv.free("p"), kv.free("c")
    assert kv.pool.num_used == 0
    kv.pool.check_invariants()


class KVMachine(RuleBasedStateMachine):
    """Random allocate / grow / fork / cache / free; check ref counts against a model."""

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(num_blocks=12, block_size=4)
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.next_id = 0

    def _new_id(self):
        self.next_id += 1
        return f"s{self.next_id}"

    @rule(length=st.integers(1, 30), vocab=st.integers(1, 3))
    def add(self, length, vocab):
        toks = [i % vocab for i in range(length)]
        hits = self.kv.find_cached_prefix(toks)
        num_hit = len(hits) * 4
        seq = self._new_id()
        if self.kv.allocate_slots(seq, length, num_hit, hits) is not None:
            self.tokens[seq], self.computed[seq] = toks, num_hit
            self.kv.cache_blocks(seq, toks, length, length - num_hit)
            self.computed[seq] = length

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), extra=st.integers(1, 9))
    def grow(self, data, extra):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        toks = self.tokens[seq] + [7] * extra
        if self.kv.allocate_slots(seq, len(toks), self.computed[seq]) is not None:
            self.kv.cache_blocks(seq, toks, len(toks), extra)
            self.tokens[seq], self.computed[seq] = toks, len(toks)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self._new_id()
        self.kv.fork(seq, child)
        self.tokens[child], self.computed[child] = list(self.tokens[seq]), self.computed[seq]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.kv.free(seq)
        del self.tokens[seq], self.computed[seq]

    @invariant()
    def ref_counts_match_tables(self):
        self.kv.pool.check_invariants()
        expected = {}
        for table in self.kv.tables.values():
            for b in table:
                expected[b] = expected.get(b, 0) + 1
        for block in self.kv.pool.blocks:
            assert block.ref_count == expected.get(block.block_id, 0)
        for seq, table in self.kv.tables.items():
            assert len(table) * 4 >= len(self.tokens[seq])
            assert len(set(table)) == len(table)

    def teardown(self):
        for seq in list(self.tokens):
            self.kv.free(seq)
        assert self.kv.pool.num_used == 0
        self.kv.pool.check_invariants()


TestKVMachine = KVMachine.TestCase
TestKVMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@given(st.lists(st.integers(0, 5), min_size=1, max_size=60))
def test_free_everything_returns_all_blocks(lengths):
    kv = KVCacheManager(num_blocks=20, block_size=4)
    live = []
    for i, n in enumerate(lengths):
        if kv.allocate_slots(f"r{i}", n + 1, 0) is not None:
            live.append(f"r{i}")
    for seq in live:
        kv.free(seq)
    assert kv.pool.num_free == 20
