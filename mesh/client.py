"""A gRPC client stream that survives the front door going away.

When the router or Envoy under a `Generate` stream dies, the stream ends with
an error and no final message (docs/mesh.md, "Failure handling"). A
`ResumingStream` then sends the request again, through a new connection, with
the output tokens it already has as `resume_token_ids` and the seed the first
message reported, so the mesh continues where the stream broke: the caller
iterates one stream, with the tokens a fault-free run gives. It gives up (and
raises the last error) after `give_up_s`, or at once on any error that is not
the front door's (a bad request, a quota, a deadline).

A front door that hangs (a stopped router) breaks nothing: its stream just goes
quiet. So a stream that brings nothing for `stall_s` is cancelled and resumed
the same way, through a new connection (Envoy's health check has taken the hung
router out by then). Set `stall_s` above the longest wait for a first token the
mesh may impose (its queue), or None to wait forever.
"""
from __future__ import annotations

import threading
import time

import grpc

from llmesh.v1 import inference_pb2, inference_pb2_grpc

# a router or Envoy that died: UNAVAILABLE, or the stream reset Envoy passes on
RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL})


def open_channel(endpoint: str, credentials=None) -> grpc.Channel:
    """A channel to the gateway: TLS with `credentials`, else plaintext."""
    if credentials is None:
        return grpc.insecure_channel(endpoint)
    return grpc.secure_channel(endpoint, credentials)


class ResumingStream:
    def __init__(self, endpoint: str, request: inference_pb2.GenerateRequest,
                 metadata=None, give_up_s: float = 60.0, pause_s: float = 0.2,
                 tls: bool = False, tls_ca: str | None = None, stall_s: float | None = 30.0):
        """`tls`: the gateway speaks TLS; `tls_ca`: a PEM file of the certificate(s) to
        trust (a self-signed gateway's own certificate; None: the system's roots)."""
        if request.sampling.n > 1:
            raise ValueError("only n = 1 streams can resume")
        self.endpoint = endpoint
        self.request = inference_pb2.GenerateRequest()
        self.request.CopyFrom(request)
        self.metadata = metadata
        self.give_up_s = give_up_s
        self.pause_s = pause_s
        self.stall_s = stall_s
        self.num_stalls = 0  # streams cancelled for bringing nothing for stall_s
        self.credentials = grpc.ssl_channel_credentials(
            open(tls_ca, "rb").read() if tls_ca else None) if tls or tls_ca else None
        self.attempts = 0  # calls made (1 when nothing broke)
        self.received: list[int] = []  # output tokens so far (after any the request resumed)

    def __iter__(self):
        deadline = time.monotonic() + self.give_up_s
        first_resume = list(self.request.resume_token_ids)
        while True:
            self.attempts += 1
            finished, watch = False, None
            try:
                with open_channel(self.endpoint, self.credentials) as channel:
                    stub = inference_pb2_grpc.InferenceStub(channel)
                    call = stub.Generate(self.request, metadata=self.metadata,
                                         timeout=max(1.0, deadline - time.monotonic()))
                    watch = _StallWatch(call, self.stall_s)
                    try:
                        for chunk in call:
                            watch.heard()
                            if chunk.seed and not self.request.sampling.HasField("seed"):
                                self.request.sampling.seed = chunk.seed
                            self.received.extend(chunk.token_ids)
                            finished = bool(chunk.finish_reason)
                            yield chunk
                    finally:
                        watch.stop()
                return
            except grpc.RpcError as e:
                if finished and not chunk.incomplete:
                    return  # the last message arrived; only the call's ending was lost
                stalled = watch is not None and watch.stalled \
                    and e.code() == grpc.StatusCode.CANCELLED
                self.num_stalls += stalled
                if (e.code() not in RESUMABLE and not stalled) \
                        or time.monotonic() + self.pause_s > deadline:
                    raise
            resume = first_resume + self.received
            if 0 < self.request.sampling.max_tokens <= len(resume):
                return  # every token arrived; only the closing message was lost
            time.sleep(self.pause_s)
            self.request.resume_token_ids[:] = resume
            self.request.request_id = ""  # the broken call's id may still be winding down


class _StallWatch:
    """Cancels `call` when `stall_s` pass with no message (None: never)."""

    def __init__(self, call, stall_s: float | None):
        self.call, self.stall_s = call, stall_s
        self.stalled = False
        self._last = time.monotonic()
        self._done = threading.Event()
        if stall_s:
            threading.Thread(target=self._run, daemon=True).start()

    def heard(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        while not self._done.wait(min(0.25, self.stall_s / 4)):
            if time.monotonic() - self._last > self.stall_s:
                self.stalled = True
                self.call.cancel()
                return
