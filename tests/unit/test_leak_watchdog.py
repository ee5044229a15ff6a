"""The leak watchdog's rule, on a moved clock."""
import mmap

from llmesh.services.common.rss import current_rss_bytes
from llmesh.services.scheduler.leak_watchdog import EXECUTORS, SCHEDULER, LeakLimits, LeakWatchdog

MIB = 2**20


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def watchdog(**limits):
    clock = Clock()
    return LeakWatchdog(LeakLimits(**limits), now=clock), clock


def test_kv_blocks_held_while_idle_past_idle_s_are_a_leak_of_the_scheduler():
    dog, clock = watchdog(idle_s=30, warmup_s=1e9)
    assert dog.check(True, 3, {}) is None
    clock.t += 29
    assert dog.check(True, 3, {}) is None
    clock.t += 2
    leak = dog.check(True, 3, {})
    assert leak is not None and leak.kind == "kv" and leak.restart == SCHEDULER
    assert "3 KV blocks" in leak.reason


def test_blocks_in_use_by_requests_or_freed_in_time_are_not_a_leak():
    dog, clock = watchdog(idle_s=30, warmup_s=1e9)
    for _ in range(10):  # busy: blocks belong to running requests
        clock.t += 10
        assert dog.check(False, 50, {}) is None
    assert dog.check(True, 2, {}) is None  # idle: the clock starts now
    clock.t += 20
    assert dog.check(False, 2, {}) is None  # a request came: the clock resets
    clock.t += 20
    assert dog.check(True, 2, {}) is None
    clock.t += 20
    assert dog.check(True, 0, {}) is None  # freed
    clock.t += 100
    assert dog.check(True, 0, {}) is None


def test_rss_grown_past_its_limit_over_the_baseline_after_warmup():
    dog, clock = watchdog(warmup_s=60, rss_growth=0.5, rss_floor_mb=100)
    assert dog.check(False, 0, {"scheduler": 100 * MIB}) is None  # warming up: no baseline
    clock.t += 61
    base = {"scheduler": 300 * MIB, "executor-0": 1000 * MIB}
    assert dog.check(False, 0, base) is None  # baselines
    # the limit is the larger of +50% and +100 MiB
    assert dog.check(False, 0, {"scheduler": 400 * MIB, "executor-0": 1500 * MIB}) is None
    leak = dog.check(False, 0, {"scheduler": 451 * MIB, "executor-0": 1000 * MIB})
    assert leak is not None and leak.kind == "rss" and leak.restart == SCHEDULER
    assert "451 MiB" in leak.reason and "450 MiB" in leak.reason
    leak = dog.check(False, 0, {"scheduler": 300 * MIB, "executor-0": 1501 * MIB})
    assert leak is not None and leak.restart == EXECUTORS


def test_a_restarted_process_gets_a_new_baseline_and_unknown_rss_is_skipped():
    dog, clock = watchdog(warmup_s=0, rss_growth=0.1, rss_floor_mb=10)
    assert dog.check(False, 0, {"executor-0": 500 * MIB, "executor-1": 0}) is None
    assert dog.check(False, 0, {"executor-0": 600 * MIB}) is not None
    dog.forget("executor-0")
    assert dog.check(False, 0, {"executor-0": 600 * MIB}) is None
    assert dog.check(False, 0, {"executor-0": 650 * MIB}) is None


def test_current_rss_follows_memory_touched():
    with mmap.mmap(-1, 64 * MIB) as fresh:  # new pages, resident once written
        before = current_rss_bytes()
        for offset in range(0, 64 * MIB, mmap.PAGESIZE):
            fresh[offset] = 1
        assert current_rss_bytes() - before > 48 * MIB
