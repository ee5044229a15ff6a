"""One thread that runs a runner's steps in order, overlapping each step's host
work with the loop that waits for the previous result.

Plans come in through `submit` (from the event loop); each outcome (a
StepResult, or the exception the step raised) goes to `post(plan, outcome)`,
called on the thread. When the next plan is already queued as a step finishes,
the lane prepares it (its diffs, inputs and their copy to the device) *before*
it posts this step's result: the loop that wakes on the result then plans and
bookkeeps while the next forward runs, instead of competing with the runner's
own host work for the GIL (in-process) or delaying it (on a GPU: the next
forward is queued before the host reads this step's tokens). After a failure
the lane runs nothing more: the scheduler starts over.
"""
from __future__ import annotations

import logging
import queue
import threading

log = logging.getLogger("llmesh.executor")
_END = object()


class StepLane:
    def __init__(self, runner, post, name: str = "llmesh-step"):
        """`runner`: prepare(plan) -> prepared, finish(prepared) -> StepResult,
        reset(); `post(plan, outcome)` receives every outcome in submission order,
        then `post(None, None)` once the lane has stopped."""
        self.runner = runner
        self._post = post
        self._plans: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, plan) -> None:
        self._plans.put(plan)

    def stop(self) -> None:
        """No plan starts after this (one running finishes): a stream that ended must
        not touch the runner that the next scheduler's stream resets and drives."""
        self._stopped.set()
        self._plans.put(_END)

    def join(self, timeout_s: float | None = None) -> None:
        """Wait for the lane's thread to end (at once when called on that thread:
        an engine collected there)."""
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _next(self, block: bool):
        """The next plan; _END once stopped; None when `block` is off and none waits."""
        try:
            plan = self._plans.get(block=block)
        except queue.Empty:
            return None
        return _END if plan is _END or self._stopped.is_set() else plan

    def _run(self) -> None:
        plan = self._next(block=True)
        prepared, error = self._prepare(plan) if plan is not _END else (None, None)
        while plan is not _END:
            if error is not None:
                self._post(plan, error)
                break
            try:
                outcome = self.runner.finish(prepared)
            except Exception as e:  # a bug: report it on this step
                log.exception("step %d failed", plan.step_id)
                self.runner.reset()
                self._post(plan, e)
                break
            nxt = self._next(block=False)  # (already queued: prepare it before posting)
            nxt_prepared, nxt_error = (self._prepare(nxt) if nxt not in (None, _END)
                                       else (None, None))
            self._post(plan, outcome)
            if nxt is None:
                nxt = self._next(block=True)
                nxt_prepared, nxt_error = (self._prepare(nxt) if nxt is not _END
                                           else (None, None))
            plan, prepared, error = nxt, nxt_prepared, nxt_error
        self._post(None, None)

    def _prepare(self, plan):
        """(the plan prepared, None), or (None, the exception) when that raised."""
        try:
            return self.runner.prepare(plan), None
        except Exception as e:  # a bug: report it on this step (after the one before)
            log.exception("step %d failed", plan.step_id)
            self.runner.reset()
            return None, e
