"""In-process Engine: composes the scheduler, KV cache manager and model runner.

The reference the mesh is measured against: same cores, no network. Usage:
`add_request` (validated, typed errors), `step` (one engine step, returns the
per-sequence deltas produced), `abort`, or `generate` to run prompts to the end.
"""
from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch


from services.common.errors import DuplicateRequestError
from services.common.sampling_params import SamplingParams, validate_request
from services.common.step_plan import (NewSequence, ScheduledSequence, StepPlan, StepResult,
                                       TokenLogprobs)
from services.executor.model import CausalLM
from services.executor.runner import ModelRunner
from services.executor.weights import load_model
from services.kvcache.manager import KVCacheManager, KVStats
from services.scheduler.policy import SchedulingPolicy
from services.scheduler.scheduler import Scheduler, SchedulerConfig, SeqOutput
from services.scheduler.sequence import Sequence


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: as many as kv_cache_bytes holds
    kv_cache_bytes: int = 256 * 2**20
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    dtype: str = "float32"
    device: str = "cpu"
    gpu_memory_utilization: float = 0.9  # on CUDA without num_kv_blocks: share of GPU memory used
    policy: SchedulingPolicy = SchedulingPolicy()  # priorities, fairness, queue bounds


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


@dataclass
class StepStats:
    num_steps: int = 0
    num_tokens: int = 0
    schedule_s: float = 0.0
    forward_s: float = 0.0
    sample_s: float = 0.0
    peak_kv_usage: float = 0.0
    slot_utilisation_at_peak: float = 0.0


class Engine:
    def __init__(self, model: CausalLM, config: EngineConfig = EngineConfig()):
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
        elif torch.device(config.device).type == "cuda":
            num_blocks = gpu_kv_blocks(model, config, per_block)
        else:
            num_blocks = max(1, config.kv_cache_bytes // per_block)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(max_model_len=self.max_model_len,
                            max_num_batched_tokens=config.max_num_batched_tokens,
                            max_num_seqs=config.max_num_seqs, eos_token_ids=mc.eos_token_ids,
                            policy=config.policy),
            self.kv)
        self.runner = ModelRunner(model, num_blocks, config.block_size, config.device)
        self.stats = StepStats()
        self._rng = random.Random()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: EngineConfig = EngineConfig()) -> "Engine":
        return cls(load_model(model_dir, config.dtype, config.device), config)

    # ---- requests -----------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams = SamplingParams(),
                    request_id: str | None = None, salt: str = "", tenant: str = "",
                    priority: str = "standard") -> str:
        """Validate and queue a request; raises InvalidRequestError naming the field, or
        QueueFullError when the priority class's queue is at its bound."""
        request_id = request_id or uuid.uuid4().hex
        self.validate(prompt_token_ids, params)
        if self.scheduler.has_request(request_id):
            raise DuplicateRequestError(request_id)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        self.scheduler.add(Sequence(
            seq_id=request_id, request_id=request_id, index=0,
            prompt_token_ids=list(prompt_token_ids), params=params, seed=seed,
            arrival_s=time.monotonic(), salt=salt, tenant=tenant, priority=priority,
        ))
        return request_id

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, self.vocab_size, self.max_model_len,
                         self.kv.pool.num_blocks * self.kv.block_size)

    def abort(self, request_id: str) -> list[SeqOutput]:
        outputs = self.scheduler.abort(request_id)
        self._release_if_idle()
        return outputs

    def _release_if_idle(self) -> None:
        """When nothing is left to run, tell the executor to forget finished sequences now
        (otherwise that rides on the next step's plan)."""
        if not self.has_unfinished() and self.scheduler.has_dropped():
            self.runner.execute(self.scheduler.schedule())

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- stepping -----------------------------------------------------
    def step(self) -> list[SeqOutput]:
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        t1 = time.perf_counter()
        result = self.runner.execute(plan) if plan.scheduled or plan.finished_seq_ids \
            else StepResult(plan.step_id)
        t2 = time.perf_counter()
        outputs = self.scheduler.update(plan, result)
        self._release_if_idle()
        self._record(plan.num_tokens, (t1 - t0) + (time.perf_counter() - t2), result)
        return outputs

    def _record(self, num_tokens: int, schedule_s: float, result: StepResult) -> None:
        s = self.stats
        s.num_steps += 1
        s.num_tokens += num_tokens
        s.schedule_s += schedule_s
        s.forward_s += result.forward_s
        s.sample_s += result.sample_s
        usage = self.kv.pool.num_used / self.kv.pool.num_blocks
        if usage > s.peak_kv_usage:
            kv = self.kv.stats()
            s.peak_kv_usage = usage
            s.slot_utilisation_at_peak = 1.0 - kv.waste

    def kv_stats(self) -> KVStats:
        return self.kv.stats()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
                 = SamplingParams()) -> list[list[Completion]]:
        """Run prompts to completion together; per prompt, its n completions by index."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        prompt_of = dict(zip(ids, prompts))
        tokens: dict[tuple[str, int], list[int]] = {}
        logprobs: dict[tuple[str, int], list[TokenLogprobs]] = {}
        done: dict[str, list[Completion]] = {i: [] for i in ids}
        while self.has_unfinished():
            for out in self.step():
                key = (out.request_id, out.index)
                tokens.setdefault(key, []).extend(out.new_token_ids)
                logprobs.setdefault(key, []).extend(out.logprobs)
                if out.finish_reason is not None:
                    done[out.request_id].append(Completion(
                        out.request_id, out.index, list(prompt_of[out.request_id]),
                        tokens.pop(key), out.finish_reason.value, out.num_cached_tokens,
                        logprobs.pop(key)))
        return [sorted(done[i], key=lambda c: c.index) for i in ids]


def gpu_kv_blocks(model: CausalLM, config: EngineConfig, per_block: int) -> int:
    """KV blocks that fit in `gpu_memory_utilization` of the GPU after the weights
    and the activations of a profiling forward of a full token budget."""
    num_tokens = config.max_num_batched_tokens
    probe_blocks = -(-num_tokens // config.block_size)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    probe = ModelRunner(model, probe_blocks, config.block_size, config.device)
    probe.execute(StepPlan(step_id=0, new=[NewSequence(
        seq_id="probe", token_ids=[0] * num_tokens, num_prompt_tokens=num_tokens,
        params=SamplingParams(), seed=0, index=0, num_computed=0,
        block_ids=list(range(probe_blocks)))],
        scheduled=[ScheduledSequence("probe", num_tokens, probe_blocks, [])]))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - probe_blocks * per_block
    del probe
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(config.device).total_memory
    budget = total * config.gpu_memory_utilization - peak
    return max(1, int(budget // per_block))
