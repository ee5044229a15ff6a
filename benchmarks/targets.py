"""Benchmark targets: what the load generator sends requests to.

Every target has the same life: `start()` (load the model or bring the mesh up,
warm it), then inside one asyncio loop `open()`, for each run `begin_run()`,
any number of concurrent `request()`s, `end_run()` (KV and step figures of the
run), then `close()`, and finally `stop()`. `request()` fills a RequestRecord
with what the client received and when. Lengths are fixed: `ignore_eos` and
greedy sampling everywhere.

Here: `engine` (the in-process Engine stepped by a background thread) and
`mesh` (gRPC streams through Envoy). The Hugging Face baselines are in
hf_targets.py. A new target subclasses Target and registers in harness.py.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid

from llmesh.benchmarks.metrics import RequestRecord
from llmesh.benchmarks.workload import BenchRequest
from llmesh.services.common.errors import LlmeshError
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.engine.engine import Engine, EngineConfig, StepStats

NEVER_EOS = -1  # an id no model produces: lengths fixed by max_tokens
WARM_PROMPT = [0] + list(range(8, 40))


class Target:
    name = "target"

    def start(self) -> None:
        pass

    async def open(self) -> None:
        pass

    async def begin_run(self) -> None:
        pass

    async def request(self, req: BenchRequest, rec: RequestRecord) -> None:
        raise NotImplementedError

    async def end_run(self) -> dict:
        """KV figures ("kv": peak_usage, waste_at_peak, preemptions, samples as
        [t, usage, waste, num_running, num_waiting]) and step figures (steps,
        mean_step_s, kv_read_tokens_per_step) where the target has them."""
        return {}

    async def close(self) -> None:
        pass

    def stop(self) -> None:
        pass


def resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future) -> None:
    """Complete a request's future from another thread (quietly if its loop is gone)."""
    def done():
        if not fut.done():
            fut.set_result(None)
    try:
        loop.call_soon_threadsafe(done)
    except RuntimeError:
        pass


def mean_kv_read(samples: list[list]) -> float | None:
    """Mean KV tokens held by running sequences, over the samples where any ran
    (each decode step reads all of them)."""
    busy = [s[5] for s in samples if s[3] > 0]
    return sum(busy) / len(busy) if busy else None


# ---- engine ---------------------------------------------------------------
class EngineTarget(Target):
    """The Engine stepping continuously in a background thread; requests are handed
    over through a deque, tokens timestamped as each step returns."""

    name = "engine"

    def __init__(self, model_dir, config: EngineConfig, sample_interval_s: float = 0.1,
                 engine_cls: type[Engine] = Engine):
        """`engine_cls`: an Engine subclass to run (one that records more, say)."""
        self.model_dir = model_dir
        self.config = config
        self.engine_cls = engine_cls
        self.sample_interval_s = sample_interval_s
        self.engine: Engine | None = None
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._live: dict[str, tuple] = {}
        self._samples: list[list] = []
        self._last_sample = 0.0
        self._preemptions0 = 0
        self._failure: str | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.engine = self.engine_cls.from_pretrained(self.model_dir, self.config)
        self.engine.generate([WARM_PROMPT], SamplingParams(max_tokens=4, ignore_eos=True))
        self._thread = threading.Thread(target=self._run, name="bench-engine", daemon=True)
        self._thread.start()

    def exclusive(self) -> threading.Lock:
        """Held, the target's thread keeps out of the engine."""
        return self._lock

    async def begin_run(self) -> None:
        with self._lock:
            self.engine.stats = StepStats()
            self._preemptions0 = self.engine.scheduler.num_preemptions
            self._samples = []
            self._sample(time.perf_counter())

    async def request(self, req: BenchRequest, rec: RequestRecord) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        request_id = uuid.uuid4().hex
        rec.sent_s = time.perf_counter()
        self._inbox.append(("add", request_id, req, rec, fut, loop))
        self._wake.set()
        try:
            await fut
        except asyncio.CancelledError:
            self._inbox.append(("cancel", request_id))
            self._wake.set()
            raise

    async def end_run(self) -> dict:
        with self._lock:
            e = self.engine
            self._sample(time.perf_counter())
            s = e.stats
            busy_s = s.schedule_s + s.forward_s + s.sample_s
            return {
                "kv": {"peak_usage": s.peak_kv_usage, "waste_at_peak": 1.0 - s.slot_utilisation_at_peak
                       if s.peak_kv_usage else 0.0,
                       "preemptions": e.scheduler.num_preemptions - self._preemptions0,
                       "num_blocks": e.kv.pool.num_blocks, "samples": self._samples},
                "steps": s.num_steps,
                "step_split_s": {"schedule_s": s.schedule_s, "forward_s": s.forward_s,
                                 "sample_s": s.sample_s},
                "mean_step_s": busy_s / s.num_steps if s.num_steps else None,
                "kv_read_tokens_per_step": mean_kv_read(self._samples),
            }

    def stop(self) -> None:
        self._halt.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- the engine thread ----------------------------------------------
    def _run(self) -> None:
        while not self._halt.is_set():
            with self._lock:
                self._drain()
                is_busy = self.engine.has_unfinished()
                if is_busy:
                    self._step()
                now = time.perf_counter()
                if now - self._last_sample >= self.sample_interval_s:
                    self._sample(now)
            if not is_busy:
                self._wake.wait(self.sample_interval_s)
                self._wake.clear()

    def _drain(self) -> None:
        while self._inbox:
            item = self._inbox.popleft()
            if item[0] == "cancel":  # the client gave up; its status is the client's to say
                if self._live.pop(item[1], None) is not None:
                    self.engine.abort(item[1])
                continue
            _, request_id, req, rec, fut, loop = item
            try:
                if self._failure:
                    raise LlmeshError(self._failure)
                self.engine.add_request(req.prompt_token_ids, SamplingParams(
                    max_tokens=req.max_tokens, ignore_eos=True), request_id=request_id,
                    priority=req.priority or "standard")
            except LlmeshError as e:
                rec.status, rec.error, rec.done_s = e.code, str(e), time.perf_counter()
                resolve(loop, fut)
                continue
            self._live[request_id] = (rec, fut, loop)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a bug: fail what is in flight, refuse the rest
            self._failure = f"engine step failed: {e!r}"
            for rec, fut, loop in self._live.values():
                rec.status, rec.error, rec.done_s = "INTERNAL", self._failure, time.perf_counter()
                resolve(loop, fut)
            self._live.clear()
            return
        t = time.perf_counter()
        for out in outputs:
            entry = self._live.get(out.request_id)
            if entry is None:
                continue
            rec = entry[0]
            rec.add_tokens(t, len(out.new_token_ids))
            if out.finish_reason is not None:
                rec.finish_reason = out.finish_reason.value
                rec.server_output_tokens = out.num_output_tokens
                rec.status, rec.done_s = "OK", t
                del self._live[out.request_id]
                resolve(entry[2], entry[1])

    def _sample(self, now: float) -> None:
        self._last_sample = now
        kv = self.engine.kv.stats()
        sched = self.engine.scheduler
        self._samples.append([now, kv.usage, kv.waste, len(sched.running), len(sched.waiting),
                              kv.num_filled_slots])


# ---- mesh -----------------------------------------------------------------
class MeshTarget(Target):
    """gRPC streams through Envoy to a mesh this target brings up (or one already running:
    `endpoint` and the schedulers' addresses, which answer GetStats)."""

    name = "mesh"

    def __init__(self, mesh_config=None, model_dir=None, endpoint: str | None = None,
                 scheduler_addrs: list[str] | None = None, sample_interval_s: float = 0.1,
                 request_timeout_s: float = 3600.0, start_timeout_s: float = 300.0,
                 stop_timeout_s: float = 2.0):
        self.mesh_config = mesh_config
        self.model_dir = model_dir
        self.endpoint = endpoint
        self.scheduler_addrs = list(scheduler_addrs or [])
        self.sample_interval_s = sample_interval_s
        self.request_timeout_s = request_timeout_s
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.mesh = None
        self._channels: list = []
        self._samples: list[list] = []
        self._sampler: asyncio.Task | None = None

    def start(self) -> None:
        if self.endpoint:
            return  # attached to a running mesh
        from llmesh.benchmarks.kit import BenchMesh
        self.mesh = BenchMesh(self.model_dir, self.mesh_config, start_timeout_s=self.start_timeout_s,
                              stop_timeout_s=self.stop_timeout_s).start()
        self.endpoint, self.scheduler_addrs = self.mesh.endpoint, self.mesh.schedulers

    async def open(self) -> None:
        import grpc

        from llmesh.v1 import inference_pb2_grpc
        self._channel = grpc.aio.insecure_channel(self.endpoint)
        self.stub = inference_pb2_grpc.InferenceStub(self._channel)
        await self.open_stats()
        self._channels.append(self._channel)
        warm = RequestRecord(-1, len(WARM_PROMPT), 4, time.perf_counter())
        await self.request(BenchRequest(WARM_PROMPT, 4), warm)
        if warm.status != "OK":
            raise RuntimeError(f"mesh warm-up request failed: {warm.status} {warm.error}")

    async def open_stats(self) -> None:
        """Channels to the schedulers, whose GetStats give the KV and step figures."""
        import grpc

        from llmesh.v1 import scheduler_pb2_grpc
        self._channels = []
        self.schedulers = []
        for addr in self.scheduler_addrs:
            ch = grpc.aio.insecure_channel(addr)
            self._channels.append(ch)
            self.schedulers.append(scheduler_pb2_grpc.SchedulerStub(ch))
        from llmesh.v1 import scheduler_pb2
        self._infos = [await s.GetInfo(scheduler_pb2.GetInfoRequest(), timeout=10)
                       for s in self.schedulers]

    async def _stats(self) -> list:
        from llmesh.v1 import scheduler_pb2
        return [await s.GetStats(scheduler_pb2.GetStatsRequest(), timeout=10)
                for s in self.schedulers]

    async def begin_run(self) -> None:
        self._samples = []
        if not self.schedulers:  # attached without the schedulers' addresses: no KV figures
            return
        self._before = await self._stats()
        self._sampler = asyncio.create_task(self._sample_loop())

    async def _sample_loop(self) -> None:
        import grpc
        while True:
            try:
                self._samples.append(self._sample(time.perf_counter(), await self._stats()))
            except grpc.aio.AioRpcError:
                pass  # a scheduler restarting: no sample this time
            await asyncio.sleep(self.sample_interval_s)

    def _sample(self, now: float, stats: list) -> list:
        """All replicas together: [t, usage, waste, running, waiting, filled slots]."""
        blocks = sum(i.num_kv_blocks for i in self._infos) or 1
        used = sum(s.num_used_blocks for s in stats)
        allocated = sum(s.num_used_blocks * i.block_size for s, i in zip(stats, self._infos))
        empty = sum(s.kv_waste * s.num_used_blocks * i.block_size for s, i in zip(stats, self._infos))
        return [now, used / blocks, empty / allocated if allocated else 0.0,
                sum(s.num_running for s in stats), sum(s.num_waiting for s in stats),
                allocated - empty]

    async def request(self, req: BenchRequest, rec: RequestRecord) -> None:
        import grpc

        from llmesh.v1 import common_pb2, inference_pb2
        from llmesh.services.common.convert import PRIORITY_VALUES
        msg = inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=req.prompt_token_ids),
            sampling=common_pb2.SamplingParams(max_tokens=req.max_tokens, ignore_eos=True),
            priority=PRIORITY_VALUES[req.priority] if req.priority else 0)
        rec.sent_s = time.perf_counter()
        call = self.stub.Generate(msg, timeout=self.request_timeout_s)
        incomplete = ""
        try:
            async for chunk in call:
                rec.add_tokens(time.perf_counter(), len(chunk.token_ids))
                if chunk.finish_reason:
                    rec.finish_reason = common_pb2.FinishReason.Name(chunk.finish_reason)
                if chunk.HasField("usage"):
                    rec.server_output_tokens = chunk.usage.completion_tokens
                if chunk.incomplete:
                    incomplete = chunk.incomplete_reason or "incomplete"
            rec.status = "INCOMPLETE" if incomplete else "OK"
            rec.error = incomplete
        except grpc.aio.AioRpcError as e:
            rec.status, rec.error = e.code().name, e.details() or ""
        except asyncio.CancelledError:
            call.cancel()
            raise
        rec.done_s = time.perf_counter()

    async def end_run(self) -> dict:
        if not self.schedulers:
            return {}
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None
        after = await self._stats()
        self._samples.append(self._sample(time.perf_counter(), after))
        split: dict[str, float] = {}
        for a, b in zip(after, self._before):
            for f in a.DESCRIPTOR.fields:  # (the time split: plain numbers, not the maps)
                if f.name.endswith("_s") and f.message_type is None:
                    split[f.name] = split.get(f.name, 0.0) + getattr(a, f.name) - getattr(b, f.name)
        steps = sum(a.num_steps - b.num_steps for a, b in zip(after, self._before))
        peak = max(self._samples, key=lambda s: s[1])
        # steps are pipelined: the loop's own time plus the time it waited for results
        step_s = split["schedule_s"] + split["executor_rpc_s"]
        messages = sum(a.num_plan_messages + a.num_result_messages - b.num_plan_messages
                       - b.num_result_messages for a, b in zip(after, self._before))
        return {
            "kv": {"peak_usage": peak[1], "waste_at_peak": peak[2],
                   "preemptions": sum(a.num_preemptions - b.num_preemptions
                                      for a, b in zip(after, self._before)),
                   "num_blocks": sum(i.num_kv_blocks for i in self._infos),
                   "samples": self._samples, "sampled_every_s": self.sample_interval_s},
            "steps": steps,
            "step_split_s": split,
            "per_step_ms": {k: 1000 * v / max(steps, 1) for k, v in split.items()},
            "mean_step_s": step_s / steps if steps else None,
            "critical_path_messages_per_step": messages / steps if steps else None,
            "kv_read_tokens_per_step": mean_kv_read(self._samples),
        }

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()
        self._channels = []

    def stop(self) -> None:
        if self.mesh is not None:
            # the services drain open streams for up to 5 s on SIGTERM; nothing is left to
            # drain once the benchmark is over, so stragglers are killed sooner
            self.mesh.__exit__()
            self.mesh = None
