"""Tests only: a replica that fails some of its requests while its health check
passes, for the router's circuit breaker to find.

`HalfFailing` fails every other request it is asked about (the scheduler answers
it at once as failed, with no tokens: what a replica that lost a request sends)
until `stop()` (SIGUSR2 to the scheduler), after which the replica recovers.
"""
from __future__ import annotations

import logging

log = logging.getLogger("llmesh.scheduler")


class HalfFailing:
    def __init__(self):
        self.active = True
        self.num_seen = 0
        self.num_failed = 0

    def fails_next(self) -> bool:
        self.num_seen += 1
        if self.active and self.num_seen % 2:
            self.num_failed += 1
            return True
        return False

    def stop(self) -> None:
        log.warning("test fault: half-failing stops after failing %d requests", self.num_failed)
        self.active = False
