"""The replicas a router sends requests to, when they come and go at run time.

The mesh's supervisor (or any orchestrator) keeps a JSON file of the replicas:

    {"replicas": [{"name": "replica-0", "address": "127.0.0.1:7001",
                   "standby": false, "draining": false}, ...]}

and every router watches it. A replica is listed only once its scheduler is
SERVING, so nothing is sent to it before; a listed one marked `draining` takes
no new requests (its running ones finish), and one that leaves the list is
dropped once nothing of it is in flight. The file is replaced atomically
(write, then rename), so a reader sees the old list or the new one.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("llmesh.router")


@dataclass(frozen=True)
class ReplicaEntry:
    name: str
    address: str
    standby: bool = False  # warm: takes requests only while another is not ready
    draining: bool = False  # takes no new requests: it is about to leave


def write_replica_set(path: Path, entries: list[ReplicaEntry]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"replicas": [asdict(e) for e in entries]}))
    os.replace(tmp, path)


def read_replica_set(path: Path) -> list[ReplicaEntry]:
    """The entries in `path`; ValueError when it is not a replica set."""
    raw = json.loads(Path(path).read_text())
    try:
        entries = [ReplicaEntry(str(e["name"]), str(e["address"]), bool(e.get("standby", False)),
                                bool(e.get("draining", False))) for e in raw["replicas"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a replica set ({e!r})") from None
    if len({e.name for e in entries}) != len(entries):
        raise ValueError(f"{path}: a replica name appears twice")
    return entries


async def watch_replica_set(path: Path, apply, every_s: float = 0.2) -> None:
    """Call `apply(entries)` with the file's entries whenever they change (a file
    being written, or unreadable, keeps the last good list, with a warning)."""
    last = None
    warned = False
    while True:
        try:
            entries = read_replica_set(path)
            warned = False
            if entries != last:
                last = entries
                apply(entries)
        except (OSError, ValueError) as e:
            if not warned:
                log.warning("replica set %s unreadable, keeping the last one: %s", path, e)
                warned = True
        await asyncio.sleep(every_s)
