"""Meshes going down in the background (integration/mesh_fixture.py `serving`).

A module's mesh takes seconds to stop (each process drains and exits), time in
which the test process only waits; so the stop runs in a thread while the next
module's mesh comes up, and is joined and checked (no process left behind) then.
A module that starts no mesh first waits for it before its first test, and so
does the end of the session (tests/conftest.py). One registry for the process
(this module has one name, unlike mesh_fixture, imported under two)."""
from __future__ import annotations

import threading
import warnings

_pending: list[tuple[threading.Thread, str, dict]] = []
_lock = threading.Lock()


def going_down(name: str, down) -> None:
    """Run `down()` in the background: it returns what `llmesh down` said when that was
    not a plain stop, and the processes it left up (which it then killed by pid)."""
    outcome: dict = {}

    def run():
        try:
            outcome["said"], outcome["left"] = down()
        except BaseException as e:  # (reported by finish, not lost in a thread)
            outcome["error"] = repr(e)
    thread = threading.Thread(target=run, name=f"down-{name}")
    thread.start()
    with _lock:
        _pending.append((thread, name, outcome))


def finish() -> None:
    """Wait for every mesh going down; assert that `llmesh down` stopped every process
    the mesh ran (restarted ones included) and did not fail."""
    while True:
        with _lock:
            if not _pending:
                return
            thread, name, outcome = _pending.pop(0)
        thread.join()
        assert "error" not in outcome, f"taking the mesh in {name} down failed: {outcome['error']}"
        assert not outcome["left"], (
            f"processes left behind by `llmesh down` of the mesh in {name} (killed since): "
            f"{outcome['left']}; {outcome['said']}")
        if outcome["said"]:
            warnings.warn(f"the mesh in {name}: {outcome['said']}")
