"""The OpenAI-compatible HTTP API (chat and text completions, SSE streaming),
served beside the gRPC API behind the same Envoy listener; it calls the
routers' gRPC Inference API, so admission, tracing and metrics are theirs."""
