"""The cyclic garbage collector kept off the step path.

A serving process makes most of its long-lived objects at start-up (modules,
protos, the model and its tensors, the KV manager's blocks). The collector's
full passes walk every one of them again, holding the GIL while they do: on
the bench box one took 93 ms in the middle of a 256-sequence run of the
in-process engine (`benchmarks/results/host-loop/gc.log`; passes over frozen
start-up objects took at most 3.4 ms). Once start-up is done, `freeze_startup()` collects what is
garbage then and moves everything else to the permanent generation, which later
passes skip; what requests create afterwards is collected as before. `thaw()`
gives the frozen objects back to the collector (an in-process engine that
closes: what its caller made meanwhile, and any old garbage frozen with it).

An in-process engine is made inside someone else's process, maybe many times
(a script, a notebook, the test suite): its freeze collects only the young
generations first. A full pass there walks the caller's whole heap at every
construction (in the test suite 0.1-0.4 s each, most of a property test's
time). Older garbage, if any, is frozen with the rest until the engine closes,
and is then found by the collector's next full pass, unless another engine
freezes it first: so an engine leaves no reference cycle of its own behind
(`InProcessExecutor.close` lets go of its worker thread), and a closed or dropped
one is freed at once, its KV cache and model with it, by reference counting.
"""
from __future__ import annotations

import gc


def freeze_startup(full: bool = True) -> None:
    """`full`: a full collection first (a serving process, once at start-up); else
    only the young generations' (an in-process engine)."""
    gc.collect(2 if full else 1)
    gc.freeze()


def thaw() -> None:
    gc.unfreeze()
