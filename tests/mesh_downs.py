"""Meshes going down in the background (integration/mesh_fixture.py `serving`).

A module's mesh takes seconds to stop (each process drains and exits), time in
which the test process only waits; so the stop runs in a thread while the next
module's mesh comes up, and is joined and checked (no process left behind) then.
A module that starts no mesh first waits for it before its first test, and so
does the end of the session (tests/conftest.py). One registry for the process
(this module has one name, unlike mesh_fixture, imported under two)."""
from __future__ import annotations

import threading

_pending: list[tuple[threading.Thread, str, dict, object]] = []
_lock = threading.Lock()


def going_down(name: str, down, pids: dict, alive) -> None:
    """Run `down()` in the background; `pids` (name -> pid) must all be gone after it."""
    thread = threading.Thread(target=down, name=f"down-{name}")
    thread.start()
    with _lock:
        _pending.append((thread, name, pids, alive))


def finish() -> None:
    """Wait for every mesh going down; assert that none left a process behind."""
    while True:
        with _lock:
            if not _pending:
                return
            thread, name, pids, alive = _pending.pop(0)
        thread.join()
        left = [n for n, pid in pids.items() if alive(pid)]
        assert not left, f"processes left behind by the mesh in {name}: {left}"
