"""A gRPC client stream that survives the front door going away.

When the router or Envoy under a `Generate` stream dies, the stream ends with
an error and no final message (docs/mesh.md, "Failure handling"). A
`ResumingStream` then sends the request again, through a new connection, with
the output tokens it already has as `resume_token_ids` and the seed the first
message reported, so the mesh continues where the stream broke: the caller
iterates one stream, with the tokens a fault-free run gives. It gives up (and
raises the last error) after `give_up_s`, or at once on any error that is not
the front door's (a bad request, a quota, a deadline).
"""
from __future__ import annotations

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
                 tls: bool = False, tls_ca: str | None = None):
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
        self.credentials = grpc.ssl_channel_credentials(
            open(tls_ca, "rb").read() if tls_ca else None) if tls or tls_ca else None
        self.attempts = 0  # calls made (1 when nothing broke)
        self.received: list[int] = []  # output tokens so far (after any the request resumed)

    def __iter__(self):
        deadline = time.monotonic() + self.give_up_s
        first_resume = list(self.request.resume_token_ids)
        while True:
            self.attempts += 1
            finished = False
            try:
                with open_channel(self.endpoint, self.credentials) as channel:
                    stub = inference_pb2_grpc.InferenceStub(channel)
                    for chunk in stub.Generate(self.request, metadata=self.metadata,
                                               timeout=max(1.0, deadline - time.monotonic())):
                        if chunk.seed and not self.request.sampling.HasField("seed"):
                            self.request.sampling.seed = chunk.seed
                        self.received.extend(chunk.token_ids)
                        finished = bool(chunk.finish_reason)
                        yield chunk
                return
            except grpc.RpcError as e:
                if finished and not chunk.incomplete:
                    return  # the last message arrived; only the call's ending was lost
                if e.code() not in RESUMABLE or time.monotonic() + self.pause_s > deadline:
                    raise
            resume = first_resume + self.received
            if 0 < self.request.sampling.max_tokens <= len(resume):
                return  # every token arrived; only the closing message was lost
            time.sleep(self.pause_s)
            self.request.resume_token_ids[:] = resume
            self.request.request_id = ""  # the broken call's id may still be winding down
