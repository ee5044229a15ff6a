"""An executor that dies and comes back with empty KV memory: the scheduler's loop
requeues what was running, forgets its prefix cache, and every request still
gets exactly the tokens of a fault-free run."""
import asyncio
import random

from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.engine.engine import Engine, EngineConfig
from llmesh.services.executor.runner import ModelRunner
from llmesh.services.scheduler.kv_manager import KVCacheManager
from llmesh.services.scheduler.loop import EngineLoop, ExecutorFailed
from llmesh.services.scheduler.scheduler import Scheduler, SchedulerConfig
from llmesh.services.scheduler.sequence import FinishReason

NUM_BLOCKS, BLOCK = 256, 16


class DyingExecutor:
    """Runs plans on a ModelRunner, in order; at the results listed in `die_at` it
    fails (every plan in flight is lost) and is replaced by a new runner, whose KV
    memory holds nothing."""

    def __init__(self, model, die_at: set[int]):
        self.model = model
        self.die_at = die_at
        self.runner = ModelRunner(model, NUM_BLOCKS, BLOCK)
        self.queue = []
        self.num_steps = 0
        self.num_compute_steps = 0  # steps with tokens to compute
        self.epochs = [self.runner.kv_epoch]

    async def submit(self, plan):
        self.queue.append(plan)

    async def result(self):
        plan = self.queue.pop(0)
        self.num_steps += 1
        self.num_compute_steps += bool(plan.scheduled)
        if self.num_steps in self.die_at:
            self.queue.clear()
            self.runner = ModelRunner(self.model, NUM_BLOCKS, BLOCK)
            self.epochs.append(self.runner.kv_epoch)
            raise ExecutorFailed("executor rank 0 connection lost")
        return self.runner.execute(plan)

    def check(self):
        pass


def _prompts():
    rng = random.Random(3)
    system = [0] + rng.choices(range(5, 3000), k=40)  # shared: prefix-cache hits
    return [system + rng.choices(range(5, 3000), k=rng.randint(1, 30)) for _ in range(12)]


def _params(i):
    if i % 2:
        return SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.9, top_p=0.9,
                              seed=100 + i)
    return SamplingParams(max_tokens=20, ignore_eos=True)


def _reference(model, prompts):
    engine = Engine(model, EngineConfig(num_kv_blocks=NUM_BLOCKS, block_size=BLOCK))
    return [c[0].token_ids for c in engine.generate(prompts, [_params(i)
                                                              for i in range(len(prompts))])]


async def _serve(model, prompts, executor, max_step_failures=2):
    kv = KVCacheManager(NUM_BLOCKS, BLOCK)
    scheduler = Scheduler(SchedulerConfig(max_model_len=512, max_num_batched_tokens=64,
                                          eos_token_ids=model.config.eos_token_ids), kv)
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}

    def emit(owner, items):
        for out, _ in items:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                reasons[out.request_id] = out.finish_reason.value

    loop = EngineLoop(scheduler, executor, model.config.vocab_size, emit=emit,
                      max_step_failures=max_step_failures)
    for i, p in enumerate(prompts):
        params = _params(i)
        loop.add(f"r{i}", p, params if params.seed is not None else params.replace(seed=7),
                 "router")
    while loop.has_work:
        try:
            await loop.step()
        except ExecutorFailed as e:
            # what the scheduler service does when its executor group fails
            assert kv.pool.num_used > 0 or not scheduler.running
            loop.invalidate_kv(str(e))
            assert kv.pool.num_used == 0 and not scheduler.running
            assert kv.find_cached_prefix(prompts[0]) == []  # nothing survives the old KV
            continue
    kv.pool.check_invariants()
    assert kv.pool.num_used == 0 and not executor.runner.seqs
    return tokens, reasons, loop


def test_requests_survive_executor_restarts_with_the_same_tokens(tiny_model):
    prompts = _prompts()
    expect = _reference(tiny_model, prompts)
    executor = DyingExecutor(tiny_model, die_at={4, 9, 15})
    tokens, reasons, loop = asyncio.run(_serve(tiny_model, prompts, executor))
    assert [tokens[f"r{i}"] for i in range(len(prompts))] == expect
    assert set(reasons.values()) == {"length"}
    assert loop.stats.num_kv_resets == 3 and len(set(executor.epochs)) == 4


def test_a_request_failing_every_step_ends_with_error_not_forever(tiny_model):
    prompts = _prompts()[:2]
    executor = DyingExecutor(tiny_model, die_at=set(range(1, 100)))
    tokens, reasons, loop = asyncio.run(_serve(tiny_model, prompts, executor,
                                               max_step_failures=2))
    assert reasons == {"r0": FinishReason.ERROR.value, "r1": FinishReason.ERROR.value}
    assert executor.num_compute_steps == 3  # requeued after 2 failures, failed on the third
