"""Dead letters: requests the mesh could not finish, kept for a person or a replay.

A request lands here when it failed after every move the router allowed (its
replicas were lost or failed it), or when its deadline passed. Each entry has
the reason, the tenant, the model, the priority, the sampling parameters and
the prompt's token ids, so `llmesh deadletters replay` can send it again; a
tenant whose policy forbids logging inputs (`log_inputs: false`) leaves only
the prompt's length. Entries go to a Redis Stream (the Redis the shared limits
use, `admission.redis_url`), capped at `maxlen`; without Redis they are only
logged. Writing never makes a request wait: the router fires and forgets.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time

log = logging.getLogger("llmesh.router")
STREAM = "llmesh:deadletters"


def make_entry(request_id: str, reason: str, tenant: str, log_inputs: bool, model: str,
               priority: str, params, prompt: list[int]) -> dict[str, str]:
    """A dead letter as Redis stream fields (strings)."""
    entry = {"request_id": request_id, "reason": reason, "tenant": tenant, "model": model,
             "priority": priority, "time": f"{time.time():.3f}",
             "sampling": json.dumps(dataclasses.asdict(params)),
             "num_prompt_tokens": str(len(prompt))}
    if log_inputs:
        entry["prompt_token_ids"] = json.dumps(prompt)
    return entry


class DeadLetters:
    """Logs dead letters; `RedisDeadLetters` also keeps them."""

    async def add(self, entry: dict[str, str]) -> None:
        log.warning("dead letter: request %s (%s), tenant %r", entry["request_id"],
                    entry["reason"], entry["tenant"])

    async def close(self) -> None:
        pass


class RedisDeadLetters(DeadLetters):
    def __init__(self, redis_url: str, stream: str = STREAM, maxlen: int = 10000):
        import redis.asyncio as aioredis
        self._redis = aioredis.from_url(redis_url, decode_responses=True,
                                        socket_timeout=2.0, socket_connect_timeout=2.0)
        self.stream = stream
        self.maxlen = maxlen

    async def add(self, entry: dict[str, str]) -> None:
        await super().add(entry)
        try:
            await self._redis.xadd(self.stream, entry, maxlen=self.maxlen, approximate=True)
        except Exception as e:  # the dead letter is logged; the request is not held up
            log.error("dead letter %s not stored: %r", entry["request_id"], e)

    async def close(self) -> None:
        await self._redis.aclose()


def dead_letters_from(admission: dict) -> DeadLetters:
    """From mesh.yaml's admission section: Redis when `state: redis`."""
    if admission.get("state") == "redis" and admission.get("redis_url"):
        return RedisDeadLetters(admission["redis_url"])
    return DeadLetters()
