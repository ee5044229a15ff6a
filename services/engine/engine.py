"""In-process Engine: the scheduler service's own loop, with the model runner in
a worker thread of this process instead of executor services.

The reference the mesh is measured against: same cores, same loop, no network.
Usage: `add_request` (validated, typed errors), `step` (one engine step,
returns the per-sequence deltas produced), `abort`, or `generate` to run
prompts to the end. Steps are pipelined as in the mesh: the loop plans the
next step while the worker thread computes the current one.
"""
from __future__ import annotations

import asyncio
import uuid
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmesh.services.common.errors import DuplicateRequestError, LlmeshError
from llmesh.services.common.heap import freeze_startup, thaw
from llmesh.services.common.sampling_params import SamplingParams, validate_request
from llmesh.services.common.step_plan import (NewSequence, ScheduledSequence, StepPlan, StepResult,
                                       TokenLogprobs)
from llmesh.services.common.tokenizer import TextTokenizer
from llmesh.services.common.gguf_file import model_path
from llmesh.services.executor.kv_memory import (DEFAULT_KV_MEMORY_SHARE, kv_cap_blocks, peak_rss_bytes,
                                         size_kv_cache)
from llmesh.services.executor.model import CausalLM
from llmesh.services.executor.runner import ModelRunner
from llmesh.services.executor.step_lane import StepLane
from llmesh.services.executor.weights import load_model
from llmesh.services.scheduler.kv_manager import KVCacheManager, KVStats
from llmesh.services.scheduler.loop import EngineLoop
from llmesh.services.scheduler.policy import QueueFullError, SchedulingPolicy
from llmesh.services.scheduler.speculation import SpeculationConfig
from llmesh.services.scheduler.scheduler import Scheduler, SchedulerConfig, SeqOutput


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    # KV blocks: num_kv_blocks, else as many as kv_cache_bytes holds, else sized from
    # the memory free after the weights (CPU: kv_memory_share of it; CUDA: below)
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    kv_memory_share: float = DEFAULT_KV_MEMORY_SHARE
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    dtype: str = "float32"
    device: str = "cpu"
    # on CUDA without num_kv_blocks: share of the memory free after the weights that the
    # KV cache (and the activations) may take
    gpu_memory_utilization: float = 0.9
    policy: SchedulingPolicy = SchedulingPolicy()  # priorities, fairness, queue bounds
    pipeline_depth: int = 2  # steps handed to the runner ahead of their results; 1 = serial
    # on CUDA: decode steps replay CUDA graphs captured at start for batches up to
    # max_num_seqs (False: every step runs eagerly)
    cuda_graphs: bool = True
    # speculative decoding (prompt lookup; services/scheduler/speculation.py): the
    # default drafts per step (0 = off; a request's speculative_tokens wins)
    speculation: SpeculationConfig = SpeculationConfig()


@dataclass
class Completion:
    """One finished sequence, as `generate` returns it."""

    request_id: str
    index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    text: str = ""  # when the engine has a tokenizer


@dataclass
class StepStats:
    num_steps: int = 0
    num_tokens: int = 0
    schedule_s: float = 0.0
    forward_s: float = 0.0
    sample_s: float = 0.0
    peak_kv_usage: float = 0.0
    slot_utilisation_at_peak: float = 0.0


class InProcessExecutor:
    """The model runner on one worker thread (a StepLane): plans run in submission
    order while the loop plans the next one, and the next plan is prepared before
    a result is handed back (torch releases the GIL inside its ops)."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self._results: deque[asyncio.Future] = deque()  # one per plan, to hand out in order
        self._unsettled: deque[asyncio.Future] = deque()  # the same, to settle in order
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lane = StepLane(runner, self._post, name="llmesh-runner")

    async def submit(self, plan: StepPlan) -> None:
        self._loop = asyncio.get_running_loop()
        future = self._loop.create_future()
        self._results.append(future)
        self._unsettled.append(future)
        self._lane.submit(plan)

    def _post(self, plan, outcome) -> None:
        if plan is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._settle, outcome)
            except RuntimeError:  # (closed meanwhile: the engine is gone, no one waits)
                pass

    def _settle(self, outcome) -> None:
        future = self._unsettled.popleft()
        if future.cancelled():  # (its waiter gave up: a hung-step timeout)
            return
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    async def result(self) -> StepResult:
        return await self._results.popleft()

    def check(self) -> None:
        pass

    def close(self) -> None:
        """Stop the worker thread and let go of it: the lane holds this executor's
        `_post`, and that cycle would keep the runner (its KV cache, the model) for
        a full collection, which an engine frozen after it never makes
        (services/common/heap.py)."""
        lane, self._lane = self._lane, None
        if lane is not None:
            lane.stop()
            lane.join(60)


class Engine:
    def __init__(self, model: CausalLM, config: EngineConfig = EngineConfig(),
                 tokenizer: TextTokenizer | None = None):
        """`tokenizer` gives outputs their text and enables stop strings."""
        self.model = model
        self.config = config
        mc = model.config
        self.vocab_size = mc.vocab_size
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        dtype = model.model.embed_tokens.weight.dtype
        per_block = ModelRunner.kv_bytes_per_block(mc, config.block_size, dtype)
        if config.num_kv_blocks:
            num_blocks = config.num_kv_blocks
        elif config.kv_cache_bytes:
            num_blocks = max(1, config.kv_cache_bytes // per_block)
        elif torch.device(config.device).type == "cuda":
            num_blocks = gpu_kv_blocks(model, config, per_block)
        else:
            num_blocks = cpu_kv_blocks(model, config, per_block, self.max_model_len)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(max_model_len=self.max_model_len,
                            max_num_batched_tokens=config.max_num_batched_tokens,
                            max_num_seqs=config.max_num_seqs, eos_token_ids=mc.eos_token_ids,
                            policy=config.policy, speculation=config.speculation),
            self.kv)
        self.runner = ModelRunner(model, num_blocks, config.block_size, config.device,
                                  tokenizer_dir=str(tokenizer.model_dir) if tokenizer else None,
                                  cuda_graph_batch=config.max_num_seqs if config.cuda_graphs
                                  else 0, max_model_len=self.max_model_len)
        self.executor = InProcessExecutor(self.runner)
        self.loop = EngineLoop(self.scheduler, self.executor, mc.vocab_size, tokenizer=tokenizer,
                               pipeline_depth=config.pipeline_depth)
        self.stats = StepStats()
        self._aio = asyncio.new_event_loop()
        # the worker thread and the event loop go with the engine, closed or not
        self._finalizer = weakref.finalize(self, _release, self.executor, self._aio)
        # (until it closes: `_release` thaws the heap then)
        freeze_startup(full=False)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: EngineConfig = EngineConfig()) -> "Engine":
        """An engine for a Hugging Face directory or a GGUF file (or a directory holding one)."""
        model_dir = model_path(model_dir)
        tokenizer = TextTokenizer(model_dir) if (Path(model_dir) / "tokenizer.json").is_file() \
            else None
        return cls(load_model(model_dir, config.dtype, config.device), config, tokenizer)

    def close(self) -> None:
        self._finalizer()

    # ---- requests -----------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams = SamplingParams(),
                    request_id: str | None = None, salt: str = "", tenant: str = "",
                    priority: str = "standard", is_offline: bool = False) -> str:
        """Validate and queue a request; raises InvalidRequestError naming the field, or
        QueueFullError when the priority class's queue is at its bound (or, unless
        `is_offline`, when its predicted wait passes the class's TTFT budget)."""
        request_id = request_id or uuid.uuid4().hex
        self.validate(prompt_token_ids, params)
        if self.scheduler.has_request(request_id):
            raise DuplicateRequestError(request_id)
        self.loop.add(request_id, list(prompt_token_ids), params, "engine", salt=salt,
                      tenant=tenant, priority=priority, has_ttft_budget=not is_offline)
        return request_id

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, self.vocab_size, self.max_model_len,
                         self.kv.pool.num_blocks * self.kv.block_size)

    def abort(self, request_id: str) -> list[SeqOutput]:
        outputs = self.loop.cancel(request_id)
        if not self.scheduler.num_unfinished:
            while self.has_unfinished():  # idle now: settle the steps in flight
                self.step()
        return outputs

    def has_unfinished(self) -> bool:
        """Requests still running or queued, or steps still in flight."""
        return self.loop.has_work

    # ---- stepping -----------------------------------------------------
    def step(self) -> list[SeqOutput]:
        s0 = self.loop.stats
        before = (s0.num_steps, s0.num_tokens, s0.schedule_s, s0.forward_s, s0.sample_s)
        outputs = self._aio.run_until_complete(self.loop.step())
        s = self.stats
        s.num_steps += s0.num_steps - before[0]
        s.num_tokens += s0.num_tokens - before[1]
        s.schedule_s += s0.schedule_s - before[2]
        s.forward_s += s0.forward_s - before[3]
        s.sample_s += s0.sample_s - before[4]
        usage = self.kv.pool.num_used / self.kv.pool.num_blocks
        if usage > s.peak_kv_usage:
            kv = self.kv.stats()
            s.peak_kv_usage = usage
            s.slot_utilisation_at_peak = 1.0 - kv.waste
        return outputs

    def kv_stats(self) -> KVStats:
        return self.kv.stats()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
                 = SamplingParams(), priority: str = "standard") -> list[list[Completion]]:
        """Run prompts to completion together; per prompt, its n completions by index.
        An offline call: never refused for a latency budget, and prompts beyond the
        class's queue bound wait for room. (`priority="batch"` for an offline job: its
        class's queue waits longest.)"""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        for p, sp in zip(prompts, params_list):  # all of them checked before any runs
            self.validate(p, sp)
        ids = [uuid.uuid4().hex for _ in prompts]
        pending = deque(zip(ids, prompts, params_list))
        prompt_of = dict(zip(ids, prompts))
        tokens: dict[tuple[str, int], list[int]] = {}
        texts: dict[tuple[str, int], list[str]] = {}
        logprobs: dict[tuple[str, int], list[TokenLogprobs]] = {}
        done: dict[str, list[Completion]] = {i: [] for i in ids}
        while pending or self.has_unfinished():
            # an offline call waits for room in its class's queue instead of failing
            while pending:
                request_id, p, sp = pending[0]
                try:
                    self.add_request(p, sp, request_id, priority=priority, is_offline=True)
                except QueueFullError:
                    if not self.has_unfinished():
                        raise
                    break
                pending.popleft()
            for out in self.step():
                key = (out.request_id, out.index)
                tokens.setdefault(key, []).extend(out.new_token_ids)
                texts.setdefault(key, []).append(out.text)
                logprobs.setdefault(key, []).extend(out.logprobs)
                if out.finish_reason is not None:
                    done[out.request_id].append(Completion(
                        out.request_id, out.index, list(prompt_of[out.request_id]),
                        tokens.pop(key), out.finish_reason.value, out.num_cached_tokens,
                        logprobs.pop(key), "".join(texts.pop(key))))
        return [sorted(done[i], key=lambda c: c.index) for i in ids]


def _release(executor: InProcessExecutor, aio: asyncio.AbstractEventLoop) -> None:
    executor.close()
    aio.close()
    thaw()


class InsufficientMemoryError(LlmeshError):
    """Not even one KV block fits in the memory left on the device."""

    code = "RESOURCE_EXHAUSTED"


def profile_forward(model: CausalLM, config: EngineConfig) -> int:
    """Run a prefill of a full token budget; returns the probe's KV blocks."""
    num_tokens = config.max_num_batched_tokens
    probe_blocks = -(-num_tokens // config.block_size)
    probe = ModelRunner(model, probe_blocks, config.block_size, config.device)
    probe.execute(StepPlan(step_id=0, new=[NewSequence(
        seq_id="probe", token_ids=[0] * num_tokens, num_prompt_tokens=num_tokens,
        params=SamplingParams(seed=0), index=0, num_computed=0,
        block_ids=list(range(probe_blocks)))],
        scheduled=[ScheduledSequence("probe", num_tokens, probe_blocks, [])]))
    return probe_blocks


def cpu_kv_blocks(model: CausalLM, config: EngineConfig, per_block: int,
                  max_model_len: int) -> int:
    """`kv_memory_share` of the memory available after the weights and a profiling
    forward (its peak RSS growth is the activations' reservation), capped at what
    `max_num_seqs` sequences of `max_model_len` tokens can fill."""
    before = peak_rss_bytes()
    probe_blocks = profile_forward(model, config)
    activations = max(0, peak_rss_bytes() - before - probe_blocks * per_block)
    cap = kv_cap_blocks(config.max_num_seqs, max_model_len, config.block_size)
    return size_kv_cache(per_block, cap, config.kv_memory_share, activations).num_blocks


def gpu_kv_blocks(model: CausalLM, config: EngineConfig, per_block: int) -> int:
    """KV blocks that fit in `gpu_memory_utilization` of the device memory that is
    *free* once the weights are loaded (so engines and executors can share a GPU),
    less the activations of a profiling forward of a full token budget."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    probe_blocks = profile_forward(model, config)
    torch.cuda.synchronize()
    activations = torch.cuda.max_memory_allocated() - before - probe_blocks * per_block
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(torch.device(config.device))
    budget = free * config.gpu_memory_utilization - activations
    if budget < per_block:
        raise InsufficientMemoryError(
            f"no KV block fits: {free / 2**30:.2f} GiB of {total / 2**30:.2f} GiB free on "
            f"{config.device}, {activations / 2**30:.2f} GiB needed for activations, "
            f"{per_block / 2**20:.1f} MiB per block; free memory, lower max_num_batched_tokens, "
            "or set num_kv_blocks")
    return int(budget // per_block)
