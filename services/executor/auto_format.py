"""What `dtype: auto` runs a model in on this machine.

On a GPU: the checkpoint's own dtype. On a CPU: bfloat16 when the CPU has
bfloat16 instructions (AVX512-BF16 or AMX; oneDNN then multiplies bfloat16
weights natively and reads half the bytes of float32), float32 elsewhere
(oneDNN's float32 linear, services/executor/projection.py). The packed
`float16-weights` format is not chosen: with oneDNN's float32 linear it is
no faster than float32 on the bench box. Quality per format on the trained
model is in BENCHMARKS.md ("Quality on a trained model").
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("llmesh.executor")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def auto_format(checkpoint_dtype: str, device: str | torch.device) -> tuple[str, str]:
    """(the format, why) for `dtype: auto` on `device`."""
    if torch.device(device).type != "cpu":
        return checkpoint_dtype, f"the checkpoint's dtype on {torch.device(device).type}"
    found = sorted(cpu_flags() & set(BF16_FLAGS))
    if found:
        return "bfloat16", f"this CPU has {', '.join(found)}"
    return "float32", "this CPU has no bfloat16 instructions (avx512_bf16, amx_bf16)"


def resolve_format(checkpoint_dtype: str, dtype: str | None, device: str | torch.device) -> str:
    """`dtype` as asked (float32 when unset), or auto's choice, logged."""
    if dtype != "auto":
        return dtype or "float32"
    name, why = auto_format(checkpoint_dtype, device)
    log.info("dtype auto: %s (%s)", name, why)
    return name
