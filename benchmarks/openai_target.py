"""The `openai` benchmark target: any OpenAI-compatible server, through
`POST /v1/completions` with `stream: true`, so llmesh (its HTTP API through
Envoy) and other servers (vLLM, SGLang, TGI, llama.cpp's server) run the same
seeded workload on equal terms.

With `--openai-url` it attaches to a running server (no KV figures); without,
it brings up the mesh as the `mesh` target does and drives its HTTP API, so a
run with `--targets mesh,openai` compares the gRPC and HTTP paths of one mesh.
Prompts go as token ids, greedy, `ignore_eos` (an extension vLLM, SGLang and
llama.cpp's server accept), and `logprobs: 0` so each event says how many tokens
it holds; the server's own count comes from `stream_options.include_usage`.
"""
from __future__ import annotations

import asyncio
import json
import time

from llmesh.benchmarks.metrics import RequestRecord
from llmesh.benchmarks.targets import WARM_PROMPT, MeshTarget
from llmesh.benchmarks.workload import BenchRequest


class OpenAITarget(MeshTarget):
    name = "openai"

    def __init__(self, mesh_config=None, model_dir=None, base_url: str | None = None,
                 model: str = "", api_key: str = "", request_timeout_s: float = 3600.0,
                 **kwargs):
        super().__init__(mesh_config, model_dir, endpoint=None, **kwargs)
        self.base_url = base_url.rstrip("/") if base_url else None
        self.model = model
        self.api_key = api_key
        self.request_timeout_s = request_timeout_s

    def start(self) -> None:
        if self.base_url:
            return  # attached: nothing to bring up, no schedulers to sample
        super().start()
        self.base_url = f"http://{self.endpoint}/v1"

    async def open(self) -> None:
        import httpx2
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx2.Limits(max_connections=4096, max_keepalive_connections=4096)
        self.http = httpx2.AsyncClient(headers=headers, limits=limits,
                                       timeout=httpx2.Timeout(self.request_timeout_s, connect=30))
        if not self.model:
            models = (await self.http.get(f"{self.base_url}/models")).json()["data"]
            self.model = models[0]["id"]
        await self.open_stats()  # our own mesh: its schedulers give KV figures (else none)
        warm = RequestRecord(-1, len(WARM_PROMPT), 4, time.perf_counter())
        await self.request(BenchRequest(WARM_PROMPT, 4), warm)
        if warm.status != "OK":
            raise RuntimeError(f"warm-up request failed: {warm.status} {warm.error}")

    async def request(self, req: BenchRequest, rec: RequestRecord) -> None:
        body = {"model": self.model, "prompt": list(req.prompt_token_ids),
                "max_tokens": req.max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "logprobs": 0, "stream_options": {"include_usage": True}}
        if req.priority:
            body["priority"] = req.priority
        rec.sent_s = time.perf_counter()
        status, error = "OK", ""
        try:
            async with self.http.stream("POST", f"{self.base_url}/completions", json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    rec.status, rec.error = f"HTTP_{r.status_code}", text[:300]
                    rec.done_s = time.perf_counter()
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        break
                    now = time.perf_counter()
                    event = json.loads(line[6:])
                    if event.get("error"):
                        status, error = "INCOMPLETE", str(event["error"].get("message", ""))
                        continue
                    if event.get("usage"):
                        rec.server_output_tokens = event["usage"]["completion_tokens"]
                    for choice in event.get("choices") or ():
                        lp = choice.get("logprobs") or {}
                        count = len(lp.get("tokens") or ()) or (1 if choice.get("text") else 0)
                        rec.add_tokens(now, count)
                        if choice.get("finish_reason"):
                            rec.finish_reason = choice["finish_reason"].upper()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken connection is this request's failure
            status, error = "UNAVAILABLE", f"{type(e).__name__}: {e}"
        rec.status, rec.error = status, error
        rec.done_s = time.perf_counter()

    async def close(self) -> None:
        await self.http.aclose()
        await super().close()
