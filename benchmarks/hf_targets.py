"""Hugging Face baselines on the same weights, served to the same load generator.

- `hf-static`: `generate` on padded static batches. A worker thread takes up to
  `batch_size` waiting requests in arrival order whenever the model is free
  (waiting up to `batch_wait_s` for a batch to fill, as static-batching servers
  do), left-pads them and decodes until the longest output; a streamer timestamps
  every step's tokens, so a request's tokens count as received as they are made
  (the best a static-batching server could stream) and it is done at its own
  last token. Padding tokens are never counted.
- `hf-cb`: transformers' own continuous batching (the `generate_batch`
  machinery) with per-token streaming, results polled by a thread.

Both load the model on `device` (default: the CPU). Given `on_tokens`, both call
`on_tokens(rec, token_ids)` from their worker thread with the token ids generated for
each request the benchmark sent (not for their own warm-ups): hf-cb as the request
finishes, hf-static when its batch's `generate` returns, both before `end_run` returns
(`llmesh bench gpu` compares them with the engine's). `stop()` lets go of the model.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid
from collections.abc import Callable

import torch

from llmesh.benchmarks.metrics import RequestRecord
from llmesh.benchmarks.targets import NEVER_EOS, WARM_PROMPT, Target, resolve
from llmesh.benchmarks.workload import BenchRequest


TokenSink = Callable[[RequestRecord, list[int]], None]


def _load_hf(model_dir, dtype, device="cpu"):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


class _RowStreamer:
    """A `generate` streamer: receives [batch] (or [batch, k]) new tokens per decoding
    step and hands each row its own tokens, up to its max_tokens."""

    def __init__(self, rows: list[tuple], max_prompt: int):
        self.rows = rows  # (req, rec, fut, loop)
        self.got = [0] * len(rows)
        self.max_prompt = max_prompt
        self.num_puts = 0
        self.steps = 0
        self.kv_slots_read = 0

    def put(self, value: torch.Tensor) -> None:
        self.num_puts += 1
        if self.num_puts == 1:
            return  # the prompt
        t = time.perf_counter()
        k = 1 if value.dim() == 1 else value.shape[-1]
        self.kv_slots_read += len(self.rows) * (self.max_prompt + self.steps)  # padded rows too
        self.steps += k
        for i, (req, rec, fut, loop) in enumerate(self.rows):
            take = min(k, req.max_tokens - self.got[i])
            if take <= 0:
                continue
            rec.add_tokens(t, take)
            self.got[i] += take
            if self.got[i] == req.max_tokens:
                rec.status, rec.done_s, rec.finish_reason = "OK", t, "length"
                rec.server_output_tokens = self.got[i]
                if fut is not None:
                    resolve(loop, fut)

    def end(self) -> None:
        pass


class HFStaticTarget(Target):
    name = "hf-static"

    def __init__(self, model_dir, batch_size: int = 16, dtype=torch.float32,
                 batch_wait_s: float = 0.02, device: str | torch.device = "cpu",
                 on_tokens: TokenSink | None = None):
        self.model_dir = model_dir
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s
        self.dtype = dtype
        self.device = torch.device(device)
        self.on_tokens = on_tokens
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._in_batch = False
        self._reset_run()

    def _reset_run(self) -> None:
        self._steps, self._busy_s, self._kv_slots_read = 0, 0.0, 0
        self._held, self._allocated = 0, 0
        self._batches: list[list[int]] = []

    def start(self) -> None:
        self.model = _load_hf(self.model_dir, self.dtype, self.device)
        self.pad = self.model.config.pad_token_id or 0
        self._generate([(BenchRequest(WARM_PROMPT, 4), RequestRecord(-1, 0, 4, 0.0), None, None)])
        self._thread = threading.Thread(target=self._run, name="bench-hf-static", daemon=True)
        self._thread.start()

    async def begin_run(self) -> None:
        with self._cond:
            self._reset_run()

    async def request(self, req: BenchRequest, rec: RequestRecord) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        rec.sent_s = time.perf_counter()
        item = (req, rec, fut, loop)
        with self._cond:
            self._queue.append(item)
            self._cond.notify()
        try:
            await fut
        except asyncio.CancelledError:
            with self._cond:
                if item in self._queue:
                    self._queue.remove(item)
            raise

    async def end_run(self) -> dict:
        deadline = time.monotonic() + 60
        while self._in_batch and time.monotonic() < deadline:  # its last rows finish first
            await asyncio.sleep(0.005)
        with self._cond:
            return {"steps": self._steps,
                    "mean_step_s": self._busy_s / self._steps if self._steps else None,
                    "kv_read_tokens_per_step": self._kv_slots_read / self._steps
                    if self._steps else None,
                    "kv": {"slot_utilisation": self._held / self._allocated
                           if self._allocated else None},
                    "batch_size": self.batch_size, "batch_wait_s": self.batch_wait_s,
                    "batches": list(self._batches)}

    def stop(self) -> None:
        self._halt.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.model = None

    def _run(self) -> None:
        while not self._halt.is_set():
            with self._cond:
                if not self._queue:
                    self._cond.wait(0.1)
                deadline = time.monotonic() + self.batch_wait_s
                while self._queue and len(self._queue) < self.batch_size \
                        and not self._halt.is_set() and time.monotonic() < deadline:
                    self._cond.wait(max(0.0, deadline - time.monotonic()))
                batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
                self._in_batch = bool(batch)
            if batch:
                self._generate(batch)
                with self._cond:
                    self._in_batch = False

    @torch.inference_mode()
    def _generate(self, batch: list[tuple]) -> None:
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
        halt = self._halt

        class Halt(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), halt.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        max_prompt = max(len(r.prompt_token_ids) for r, *_ in batch)
        max_new = max(r.max_tokens for r, *_ in batch)
        ids = torch.full((len(batch), max_prompt), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (r, *_) in enumerate(batch):  # left padding
            ids[j, max_prompt - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            mask[j, max_prompt - len(r.prompt_token_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        gc = GenerationConfig(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                              eos_token_id=NEVER_EOS, pad_token_id=self.pad)
        streamer = _RowStreamer(batch, max_prompt)
        t0 = time.perf_counter()
        try:
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gc,
                                      streamer=streamer,
                                      stopping_criteria=StoppingCriteriaList([Halt()]))
            error = ""
        except Exception as e:  # noqa: BLE001 - reported per request
            error = repr(e)
        busy = time.perf_counter() - t0
        if self.on_tokens is not None and not error:
            seqs = getattr(out, "sequences", out)[:, max_prompt:].tolist()
            for row, (r, rec, *_) in zip(seqs, batch):
                if rec.index >= 0:  # (-1: the warm-up)
                    self.on_tokens(rec, row[:r.max_tokens])
        for r, rec, fut, loop in batch:
            if rec.status == "PENDING":
                rec.status = "INTERNAL" if error else "CANCELLED"
                rec.error, rec.done_s = error, time.perf_counter()
                if fut is not None:
                    resolve(loop, fut)
        with self._cond:
            self._steps += streamer.steps
            self._busy_s += busy
            self._kv_slots_read += streamer.kv_slots_read
            self._held += sum(len(r.prompt_token_ids) + r.max_tokens for r, *_ in batch)
            self._allocated += len(batch) * (max_prompt + max_new)
            self._batches.append([rec.index for _, rec, _, _ in batch])


MASK_BUDGET_BYTES = 2**30


class HFCBTarget(Target):
    """Given the engine's KV capacity (tokens), token budget per step and running cap, so
    both schedule within the same limits. Left to itself on CPU it sizes its cache from
    the machine's memory, and without flash attention every step builds a dense
    [batch tokens, cache tokens] mask, so the cache is also capped to keep that mask
    under 1 GiB; the capacity it got is reported."""

    name = "hf-cb"

    def __init__(self, model_dir, max_new_tokens: int = 512, dtype=torch.float32,
                 kv_tokens: int | None = None, max_batch_tokens: int | None = None,
                 max_requests_per_batch: int | None = None, device: str | torch.device = "cpu",
                 on_tokens: TokenSink | None = None):
        self.model_dir = model_dir
        self.max_new_tokens = max_new_tokens
        self.dtype = dtype
        self.device = torch.device(device)
        self.on_tokens = on_tokens
        self.kv_tokens = kv_tokens
        self.max_batch_tokens = max_batch_tokens
        self.max_requests_per_batch = max_requests_per_batch
        self._live: dict[str, list] = {}
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._cm = None

    def start(self) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        model = _load_hf(self.model_dir, self.dtype, self.device)
        gc = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False,
                              eos_token_id=NEVER_EOS, pad_token_id=model.config.pad_token_id or 0)
        cb = ContinuousBatchingConfig(max_batch_tokens=self.max_batch_tokens,
                                      max_requests_per_batch=self.max_requests_per_batch)
        if self.kv_tokens:
            tokens = self.kv_tokens
            if self.max_batch_tokens:
                tokens = min(tokens, MASK_BUDGET_BYTES // (4 * self.max_batch_tokens))
            cb.num_blocks = max(1, -(-tokens // _page_size(cb)))
        self.cb_config = cb
        self._cm = model.continuous_batching_context_manager(
            generation_config=gc, block=True, timeout=30, continuous_batching_config=cb)
        self.manager = self._cm.__enter__()
        self._thread = threading.Thread(target=self._poll, name="bench-hf-cb", daemon=True)
        self._thread.start()

    async def open(self) -> None:
        warm = RequestRecord(-1, len(WARM_PROMPT), 4, time.perf_counter())
        await self.request(BenchRequest(WARM_PROMPT, 4), warm)
        if warm.status != "OK":
            raise RuntimeError(f"hf-cb warm-up request failed: {warm.status} {warm.error}")

    async def request(self, req: BenchRequest, rec: RequestRecord) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        request_id = uuid.uuid4().hex
        with self._lock:
            self._live[request_id] = [rec, fut, loop, 0]
        rec.sent_s = time.perf_counter()
        added = self.manager.add_request(req.prompt_token_ids, request_id=request_id,
                                         max_new_tokens=req.max_tokens, streaming=True,
                                         eos_token_id=NEVER_EOS)
        if added is None:
            with self._lock:
                self._live.pop(request_id, None)
            rec.status, rec.error, rec.done_s = "UNAVAILABLE", "refused", time.perf_counter()
            return
        try:
            await fut
        except asyncio.CancelledError:
            self.manager.cancel_request(request_id)
            with self._lock:
                self._live.pop(request_id, None)
            raise

    async def end_run(self) -> dict:
        cb = self.cb_config
        return {"config": {"num_blocks": cb.num_blocks, "page_size": _page_size(cb),
                           "max_batch_tokens": cb.max_batch_tokens,
                           "max_requests_per_batch": cb.max_requests_per_batch}}

    def _poll(self) -> None:
        while not self._halt.is_set():
            result = self.manager.get_result(timeout=0.05)
            if result is None:
                continue
            t = time.perf_counter()
            with self._lock:
                entry = self._live.get(result.request_id)
                if entry is None:
                    continue
                rec, fut, loop, got = entry
                n = len(result.generated_tokens)
                rec.add_tokens(t, n - got)
                entry[3] = max(got, n)
                if result.is_finished():
                    del self._live[result.request_id]
                    if self.on_tokens is not None and rec.index >= 0:  # (-1: the warm-up)
                        self.on_tokens(rec, list(result.generated_tokens))
                    rec.done_s, rec.server_output_tokens = t, n
                    rec.status = "INTERNAL" if result.error else "OK"
                    rec.error = str(result.error or "")
                    resolve(loop, fut)

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None
        self.manager = None


def _page_size(cb) -> int:
    """Tokens per KV block of transformers' continuous batching config: `page_size`
    in transformers 5.2x, `block_size` in earlier 5.x releases (5.17 has no page_size)."""
    size = getattr(cb, "page_size", None) or getattr(cb, "block_size", None)
    return int(size or 256)
