"""Known-answer probes: catch a replica that answers OK with wrong tokens.

Every `interval_s` the replica runs a fixed greedy prompt through its own loop,
like any request. Its tokens must equal the answer recorded by the first probe
(or one given in the config), within `timeout_s`. A wrong or late answer ejects
the replica: it turns NOT_SERVING (routers send it nothing), its prefix cache is
dropped and its running requests end with ERROR, which routers answer by moving
them elsewhere, and its executors restart. A later probe that passes readmits it.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

from llmesh.services.common.finish_reason import FinishReason
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.scheduler.loop import EngineLoop
from llmesh.services.scheduler.replica_state import ReplicaState

log = logging.getLogger("llmesh.scheduler")
OWNER = "known-answer-probe"


class KnownAnswerProbe:
    def __init__(self, loop: EngineLoop, outputs: asyncio.Queue, state: ReplicaState,
                 vocab_size: int, interval_s: float = 30.0, timeout_s: float = 10.0,
                 num_tokens: int = 8, expected: list[int] | None = None,
                 restart: Callable[[], Awaitable[None]] | None = None):
        """`outputs` receives the loop's outputs for OWNER; the verdicts go to the
        replica's `state` (a fail ejects it, a pass readmits it); `restart()`
        restarts the executors of an ejected replica (returns once they are back)."""
        self.restart = restart
        self.loop = loop
        self.outputs = outputs
        self.state = state
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        # a fixed prompt of ordinary ids, the same on every replica of a model
        self.prompt = [(7919 * i + 13) % vocab_size for i in range(1, 17)]
        self.params = SamplingParams(max_tokens=num_tokens, ignore_eos=True, seed=0)
        self.expected = expected
        self.num_probes = 0
        self.num_failures = 0
        self._ids = itertools.count(1)

    async def run(self) -> None:
        """Probe every `interval_s` while the state allows (executors up, no drain)."""
        while True:
            await asyncio.sleep(self.interval_s)
            if self.state.can_probe:
                await self.probe_once()

    async def probe_once(self) -> bool:
        t0 = time.monotonic()
        tokens, why = await self._ask()
        elapsed = time.monotonic() - t0
        self.num_probes += 1
        if tokens is not None and self.expected is None:
            self.expected = tokens  # the first answer is the known one
            log.info("known-answer probe recorded %s", tokens)
        if why is None and tokens != self.expected:
            why = f"answered {tokens}, expected {self.expected}"
        if why is None and elapsed > self.timeout_s:
            why = f"answered in {elapsed:.1f}s (limit {self.timeout_s:g}s)"
        if why is not None:
            self.num_failures += 1
            if not self.state.is_ejected:
                log.error("known-answer probe failed (%s): ejecting this replica", why)
                await self.state.probe_failed()
                # its answers cannot be trusted: what runs ends (routers move it), and
                # no later request may hit KV it computed (steps in flight still report
                # back in order; their results are for finished sequences, ignored)
                self.loop.fail_all()
                self.loop.kv.reset_prefix_cache()
                if self.restart is not None:  # fresh executors; the next probe judges them
                    log.warning("restarting the executors of the ejected replica")
                    await self.restart()
            return False
        if self.state.is_ejected:
            log.warning("known-answer probe passed again: readmitting this replica")
            await self.state.probe_passed()
        return True

    async def _ask(self) -> tuple[list[int] | None, str | None]:
        request_id = f"{OWNER}-{next(self._ids)}"
        while not self.outputs.empty():
            self.outputs.get_nowait()
        try:
            self.loop.add(request_id, self.prompt, self.params, OWNER,
                          priority="interactive")
        except Exception as e:  # a full queue is not a wrong answer
            return self.expected, None if "queue" in str(e) else repr(e)
        tokens: list[int] = []
        try:
            async with asyncio.timeout(self.timeout_s * 3):
                while True:
                    out = await self.outputs.get()
                    if out.request_id != request_id:
                        continue
                    tokens += out.new_token_ids
                    if out.finish_reason is not None:
                        if out.finish_reason is not FinishReason.LENGTH:
                            return None, f"ended with {out.finish_reason.value}"
                        return tokens, None
        except TimeoutError:
            self.loop.cancel(request_id)
            return None, f"no answer in {self.timeout_s * 3:g}s"
