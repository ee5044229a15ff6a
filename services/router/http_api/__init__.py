"""The OpenAI-compatible HTTP API (chat and text completions, SSE streaming),
served by each router beside its gRPC API (behind the same Envoy listener): the
HTTP layer calls the router's Inference handlers in-process, so admission,
tracing and metrics are theirs and no hop is added."""
