"""python -m llmesh.services.scheduler --port P --model DIR --kvcache ADDR --replica-name NAME
    --executors ADDR[,ADDR...] --num-kv-blocks N"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import signal
import time

from llmesh.v1 import scheduler_pb2, scheduler_pb2_grpc
from llmesh.observability import telemetry
from llmesh.observability.metrics import register_scheduler, step_histogram
from llmesh.services.common.server import Service
from llmesh.services.common.tokenizer import TextTokenizer
from llmesh.services.executor.kv_memory import kv_cap_blocks
from llmesh.services.executor.model_config import load_model_config
from llmesh.services.scheduler.executor_client import ExecutorGroup
from llmesh.services.scheduler.kv_events import KVEventLog
from llmesh.services.scheduler.kv_manager import KVCacheManager
from llmesh.services.scheduler.kv_publisher import KVPublisher
from llmesh.services.scheduler.loop import EngineLoop, ExecutorFailed
from llmesh.services.scheduler.policy import policy_from_dict
from llmesh.services.scheduler.replica_state import ReplicaState, State
from llmesh.services.scheduler.slo import WaitPredictor
from llmesh.services.scheduler.speculation import SpeculationConfig
from llmesh.services.scheduler.scheduler import Scheduler, SchedulerConfig
from llmesh.services.scheduler import probe
from llmesh.services.scheduler.drain import LeakGuard, drain, restart_executors
from llmesh.services.scheduler.leak_watchdog import LeakLimits, LeakWatchdog
from llmesh.services.scheduler.faults import HalfFailing
from llmesh.services.scheduler.servicer import OutputHub, SchedulerServicer, replica_load
from llmesh.services.common.gguf_file import model_arg

log = logging.getLogger("llmesh.scheduler")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="llmesh.services.scheduler")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True, type=model_arg)
    p.add_argument("--model-name", default="")
    p.add_argument("--kvcache", required=True, help="the kvcache index's address")
    p.add_argument("--replica-name", default="replica-0", help="this replica, in the index")
    p.add_argument("--executors", required=True, help="comma-separated rank addresses, rank 0 first")
    p.add_argument("--num-kv-blocks", type=int, required=True)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=0)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--pipeline-depth", type=int, default=2,
                   help="steps sent to the executors ahead of their results (1 = serial)")
    p.add_argument("--step-timeout-s", type=float, default=30.0,
                   help="a step without a result this long (or 20x its expected time) means "
                        "a hung executor: the replica goes NOT_SERVING and recovers (0 = never)")
    p.add_argument("--executor-recovery-s", type=float, default=60.0,
                   help="how long queued requests wait for a failed executor group to return")
    p.add_argument("--probe-interval-s", type=float, default=30.0,
                   help="seconds between known-answer probes (0 = none)")
    p.add_argument("--probe-timeout-s", type=float, default=10.0,
                   help="a probe answer later than this fails it")
    p.add_argument("--probe-expected", default="",
                   help="the probe's known answer as a JSON list of token ids "
                        "(default: what the first probe answers)")
    p.add_argument("--drain-timeout-s", type=float, default=120.0,
                   help="on a graceful stop or restart, how long running requests may finish")
    p.add_argument("--leak-check-s", type=float, default=10.0,
                   help="seconds between leak watchdog checks (0 = no watchdog)")
    p.add_argument("--leak-idle-s", type=float, default=30.0,
                   help="KV blocks still allocated this long with no request are leaked")
    p.add_argument("--leak-rss-growth", type=float, default=0.5,
                   help="a process whose RSS grows by this share over its baseline leaks ...")
    p.add_argument("--leak-rss-floor-mb", type=float, default=256.0,
                   help="... and by at least this many MiB")
    p.add_argument("--leak-warmup-s", type=float, default=60.0,
                   help="the RSS baselines are taken after this")
    p.add_argument("--test-leak-kv-blocks", type=int, default=0,
                   help="tests only: after a SIGUSR1, lose this many KV blocks once idle")
    p.add_argument("--test-fail-half", action="store_true",
                   help="tests only: fail every other request sent here until a SIGUSR2")
    p.add_argument("--admission", default="{}", help="mesh.yaml's admission section as JSON")
    p.add_argument("--speculative-tokens", type=int, default=0,
                   help="speculative decoding: default draft tokens a step (0 = off)")
    p.add_argument("--speculative-ngram-max", type=int, default=4)
    p.add_argument("--speculative-ngram-min", type=int, default=2)
    return p.parse_args(argv)


async def main(args) -> None:
    mc = load_model_config(args.model)
    max_model_len = min(args.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    events = KVEventLog()
    # 0: the executors size their KV from memory; start at the most that can be used and
    # shrink to the smallest rank's count when they connect
    num_kv_blocks = args.num_kv_blocks or kv_cap_blocks(args.max_num_seqs, max_model_len,
                                                        args.block_size)
    kv = KVCacheManager(num_kv_blocks, args.block_size, not args.no_prefix_caching,
                        on_event=events.record)
    scheduler = Scheduler(SchedulerConfig(max_model_len=max_model_len,
                                          max_num_batched_tokens=args.max_num_batched_tokens,
                                          max_num_seqs=args.max_num_seqs,
                                          eos_token_ids=mc.eos_token_ids,
                                          policy=policy_from_dict(json.loads(args.admission)),
                                          speculation=SpeculationConfig(
                                              args.speculative_tokens,
                                              args.speculative_ngram_max,
                                              args.speculative_ngram_min)),
                          kv)
    executors = ExecutorGroup(args.executors.split(","))
    service = Service("scheduler", args.port)
    # the replica's lifecycle; its health status follows it (SERVING only when serving)
    state = ReplicaState(on_change=lambda s: service.set_serving(s is State.SERVING))
    waits = WaitPredictor(scheduler)  # (the loop's; the load reports say what it refuses)
    hub = OutputHub(load=functools.partial(replica_load, scheduler, state, waits))
    publisher = KVPublisher(args.kvcache, args.replica_name, events, kv)
    step_hist = step_histogram()
    probe_outputs: asyncio.Queue = asyncio.Queue()

    def after_step(seconds: float) -> None:
        step_hist.observe(seconds)
        publisher.notify()

    def emit(owner: str, items) -> None:
        if owner == probe.OWNER:
            for out, _ in items:
                probe_outputs.put_nowait(out)
        else:
            hub.emit(owner, items)

    loop = EngineLoop(scheduler, executors, mc.vocab_size, emit=emit,
                      tokenizer=TextTokenizer(args.model), model=args.model_name or mc.model_type,
                      pipeline_depth=args.pipeline_depth, step_timeout_s=args.step_timeout_s,
                      observe_step=after_step, state=state, waits=waits, plan_first=True)
    info = scheduler_pb2.ReplicaInfo(
        model=args.model_name or mc.model_type, architecture=mc.architecture,
        max_model_len=max_model_len, vocab_size=mc.vocab_size,
        num_kv_blocks=num_kv_blocks, block_size=args.block_size)
    prober = probe.KnownAnswerProbe(
        loop, probe_outputs, state, mc.vocab_size,
        interval_s=args.probe_interval_s, timeout_s=args.probe_timeout_s,
        expected=json.loads(args.probe_expected) if args.probe_expected else None,
        restart=lambda: restart_executors(loop, executors, args.drain_timeout_s))
    register_scheduler(loop, prober)
    faults = HalfFailing() if args.test_fail_half else None
    servicer = SchedulerServicer(loop, hub, executors, info, prober, faults)
    if faults is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, faults.stop)
    service.add(scheduler_pb2_grpc.add_SchedulerServicer_to_server, servicer,
                "llmesh.v1.Scheduler")
    await service.start()
    tasks = [asyncio.ensure_future(publisher.run()), asyncio.ensure_future(hub.report_load()),
             asyncio.ensure_future(_drive(loop, executors, info, publisher.notify,
                                          args.executor_recovery_s))]
    if args.probe_interval_s:
        tasks.append(asyncio.ensure_future(prober.run()))
    if args.leak_check_s:
        limits = LeakLimits(args.leak_check_s, args.leak_idle_s, 0, args.leak_rss_growth,
                            args.leak_rss_floor_mb, args.leak_warmup_s)
        guard = LeakGuard(LeakWatchdog(limits), loop, executors, service.stop,
                          args.drain_timeout_s,
                          args.test_leak_kv_blocks)
        tasks.append(asyncio.ensure_future(guard.run()))
        if args.test_leak_kv_blocks:
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, guard.test_leak_kv)
    async def drain_then_close():
        await drain(loop, args.drain_timeout_s)
        servicer.close_streams()
        await state.stopped()
    # (drained: what is left are health watches, which need no grace)
    await service.wait_for_termination(grace_s=0.5, before_stop=drain_then_close)
    for task in tasks:
        task.cancel()


async def _drive(loop: EngineLoop, executors: ExecutorGroup, info: scheduler_pb2.ReplicaInfo,
                 kv_changed, recovery_s: float) -> None:
    """Run the engine loop; when the executor group fails, go NOT_SERVING (the
    replica's state: executors down), put
    the running requests back in the queue (they resume from their tokens so far
    once the group is back), forget the KV cache, reconnect, and serve again."""
    kv_epochs: tuple[int, ...] = ()  # the executor KV that the prefix cache describes
    down_since = time.monotonic()
    while True:
        await executors.connect()
        try:
            await executors.probe(timeout_s=10)
        except (ExecutorFailed, asyncio.TimeoutError) as e:
            log.warning("executor group not ready: %r", e)
            await executors.close()
            # queued requests wait for the group, within their deadlines and a bound
            loop.expire_deadlines()
            if loop.tracks and time.monotonic() - down_since > recovery_s:
                log.error("executor group down for over %.0fs; failing queued requests",
                          recovery_s)
                loop.fail_all()
            await asyncio.sleep(0.5)
            continue
        if executors.kv_epochs != kv_epochs:
            if kv_epochs:
                loop.invalidate_kv(f"executor KV epochs {kv_epochs} -> {executors.kv_epochs}")
                kv_changed()
            kv_epochs = executors.kv_epochs
        if executors.capacity and executors.capacity < loop.kv.pool.num_blocks:
            if loop.kv.pool.num_used:
                log.error("executor ranks hold %d KV blocks, fewer than the %d in use",
                          executors.capacity, loop.kv.pool.num_used)
                await executors.close()
                await asyncio.sleep(0.5)
                continue
            log.info("KV capacity: %d blocks, the smallest executor rank's",
                     executors.capacity)
            loop.kv.limit_blocks(executors.capacity)
            info.num_kv_blocks = executors.capacity
        # (back from a drained restart, the replica takes requests again)
        await loop.state.executors_up()
        watch = asyncio.ensure_future(executors.watch(loop.wake))
        try:
            await loop.run()
        except ExecutorFailed as e:
            log.error("executor group failed: %s; requeueing running requests", e)
            await loop.state.executors_down()
            # a failed step may have half-written blocks, and a rank that dies takes its
            # KV with it: nothing cached survives
            loop.invalidate_kv(f"executor group failed: {e}")
        except Exception:  # a bug: never leave requests hanging on a dead loop
            log.exception("engine loop failed; failing in-flight requests and restarting it")
            await loop.state.executors_down()
            loop.invalidate_kv("engine loop failed", requeue=False)
        finally:
            watch.cancel()
        kv_changed()
        kv_epochs = ()
        down_since = time.monotonic()
        await executors.close()
        await asyncio.sleep(0.2)


if __name__ == "__main__":
    telemetry.init("scheduler")
    try:
        asyncio.run(main(parse_args()))
    finally:
        telemetry.shutdown()
