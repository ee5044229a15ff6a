"""KVCache gRPC servicer: replays each step's Commit onto the authoritative pool."""
from __future__ import annotations

import asyncio

import grpc

from observability import telemetry
from llmesh.v1 import kvcache_pb2, kvcache_pb2_grpc
from services.scheduler.kv_manager import KVCacheManager, replay


def ops_to_proto(ops: list[tuple]) -> list[kvcache_pb2.KVOp]:
    out = []
    for op in ops:
        kind = op[0]
        if kind == "allocate":
            out.append(kvcache_pb2.KVOp(allocate=kvcache_pb2.Allocate(
                seq_id=op[1], num_total_tokens=op[2], write_from=op[3], cached_block_ids=op[4])))
        elif kind == "cache":
            out.append(kvcache_pb2.KVOp(cache=kvcache_pb2.CacheBlocks(
                seq_id=op[1], num_computed=op[2], num_new=op[3], salt=op[4],
                first_token_index=op[5], token_ids=op[6])))
        elif kind == "fork":
            out.append(kvcache_pb2.KVOp(fork=kvcache_pb2.Fork(parent_seq_id=op[1],
                                                              child_seq_id=op[2])))
        elif kind == "free":
            out.append(kvcache_pb2.KVOp(free_seq_id=op[1]))
        elif kind == "lookup":
            out.append(kvcache_pb2.KVOp(lookup=kvcache_pb2.Lookup(num_tokens=op[1],
                                                                  num_hit_tokens=op[2])))
        elif kind == "reset_prefix_cache":
            out.append(kvcache_pb2.KVOp(reset_prefix_cache=True))
    return out


def ops_from_proto(msgs) -> list[tuple]:
    ops = []
    for m in msgs:
        kind = m.WhichOneof("op")
        if kind == "allocate":
            a = m.allocate
            ops.append(("allocate", a.seq_id, a.num_total_tokens, a.write_from,
                        list(a.cached_block_ids)))
        elif kind == "lookup":
            ops.append(("lookup", m.lookup.num_tokens, m.lookup.num_hit_tokens))
        elif kind == "cache":
            c = m.cache
            ops.append(("cache", c.seq_id, c.num_computed, c.num_new, c.salt, c.first_token_index,
                        list(c.token_ids)))
        elif kind == "fork":
            ops.append(("fork", m.fork.parent_seq_id, m.fork.child_seq_id))
        elif kind == "free_seq_id":
            ops.append(("free", m.free_seq_id))
        elif kind == "reset_prefix_cache":
            ops.append(("reset_prefix_cache",))
    return ops


class KVCacheServicer(kvcache_pb2_grpc.KVCacheServicer):
    def __init__(self, kv: KVCacheManager):
        self.kv = kv
        self._subscribers: list[asyncio.Queue] = []

    async def Commit(self, request, context):
        span = None
        if request.traceparent and telemetry.tracing_enabled():
            span = telemetry.tracer("llmesh.kvcache").start_span(
                "kvcache.commit", context=telemetry.extract(request.traceparent),
                attributes={"llmesh.step_id": request.step_id, "llmesh.kv.num_ops": len(request.ops)})
        try:
            replay(self.kv, ops_from_proto(request.ops))
        except (AssertionError, KeyError, ValueError) as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"step {request.step_id}: commit does not apply: {e!r}")
        finally:
            if span is not None:
                span.end()
        self._publish()
        return kvcache_pb2.CommitResponse(num_used_blocks=self.kv.pool.num_used)

    async def GetStats(self, request, context):
        s = self.kv.stats()
        return kvcache_pb2.KVStatsResponse(
            num_blocks=s.num_blocks, num_used_blocks=s.num_used_blocks, usage=s.usage,
            waste=s.waste, prefix_hit_rate=s.prefix_hit_rate, num_evictions=s.num_evictions)

    async def Events(self, request, context):
        queue: asyncio.Queue = asyncio.Queue(maxsize=10000)
        self._subscribers.append(queue)
        try:
            while True:
                kind, block_hash = await queue.get()
                yield kvcache_pb2.KVEvent(
                    kind=kvcache_pb2.KVEvent.KIND_STORED if kind == "stored"
                    else kvcache_pb2.KVEvent.KIND_REMOVED, block_hash=block_hash)
        finally:
            self._subscribers.remove(queue)

    def _publish(self) -> None:
        events, self.kv.pool.events = self.kv.pool.events, []
        for queue in self._subscribers:
            for event in events:
                if queue.full():
                    break  # a slow subscriber loses events rather than stalling commits
                queue.put_nowait(event)
