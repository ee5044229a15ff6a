"""KVCache gRPC servicer: the replicas' prefix index, fed by their Publish streams."""
from __future__ import annotations

import itertools
import logging

from llmesh.v1 import kvcache_pb2, kvcache_pb2_grpc
from llmesh.services.common import convert
from llmesh.services.kvcache.index import PrefixIndex

log = logging.getLogger("llmesh.kvcache")


class KVCacheServicer(kvcache_pb2_grpc.KVCacheServicer):
    def __init__(self, index: PrefixIndex):
        self.index = index
        self._stream_ids = itertools.count(1)
        self._owners: dict[str, int] = {}  # replica -> the stream that feeds it now

    async def Publish(self, request_iterator, context):
        """Snapshots and batches of one scheduler. A batch that does not continue the
        index gets one resync request (further batches are refused until a snapshot
        comes). When the stream ends, the replica's index goes with it."""
        stream_id = next(self._stream_ids)
        replica = ""
        is_asking = False
        try:
            async for req in request_iterator:
                if replica != req.replica:
                    replica = req.replica
                    self._owners[replica] = stream_id
                kind = req.WhichOneof("msg")
                if kind == "snapshot":
                    self.index.load_snapshot(replica, convert.snapshot_from_proto(req.snapshot))
                    is_asking = False
                    continue
                if kind != "batch":
                    continue
                try:
                    reason = self.index.apply(replica, convert.batch_from_proto(req.batch))
                except ValueError as e:
                    reason = str(e)
                if reason and not is_asking:
                    log.info("replica %s: resync (%s)", replica, reason)
                    is_asking = True
                    yield kvcache_pb2.PublishResponse(need_snapshot=True, reason=reason)
        finally:
            if replica and self._owners.get(replica) == stream_id:
                del self._owners[replica]
                self.index.forget(replica)  # its pool is gone, or will resend everything

    async def Match(self, request, context):
        matches = self.index.match(list(request.token_ids), request.salt)
        return kvcache_pb2.MatchResponse(replicas=[
            kvcache_pb2.ReplicaMatch(replica=name, num_blocks=n,
                                     num_tokens=n * self.index.replicas[name].block_size)
            for name, n in sorted(matches.items())])

    async def GetStats(self, request, context):
        return kvcache_pb2.KVStatsResponse(replicas=[
            kvcache_pb2.ReplicaIndexStats(
                replica=name, epoch=r.epoch, next_event_id=r.next_event_id,
                num_blocks=len(r.blocks), num_snapshots=r.num_snapshots,
                num_events=r.num_events, is_synced=r.is_synced)
            for name, r in sorted(self.index.replicas.items())])
