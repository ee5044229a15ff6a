"""What `dtype: auto` runs a model in on this machine.

On a GPU: the checkpoint's own dtype. On a CPU: bfloat16 when the CPU has AMX
(oneDNN's bfloat16 matrix tiles; half the bytes of float32 to read), float32
elsewhere (oneDNN's float32 linear, services/executor/projection.py). On a CPU
with AVX512-BF16 but no AMX (the bench box, an AMD EPYC) llmesh's bfloat16 was
slower than its float32 in the served comparison (BENCHMARKS.md, "CPU decode":
single stream 9.75 against 8.72 ms a token, offline 277 against 395 tokens/s,
medians of 3 rounds): the norms and rotary embeddings cast to float32 and back in every
layer, and oneDNN's bfloat16 matrix-vector product read weights no faster per
byte. The packed `float16-weights` format is not chosen either: it needs
fbgemm, and it was not measured against oneDNN's float32. Quality per format on the
trained model is in BENCHMARKS.md ("Quality on a trained model").
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("llmesh.executor")
BF16_FLAGS = ("amx_bf16",)


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
    return "float32", "this CPU has no AMX (amx_bf16): float32 through oneDNN is faster"


def resolve_format(checkpoint_dtype: str, dtype: str | None, device: str | torch.device) -> str:
    """`dtype` as asked (float32 when unset), or auto's choice, logged."""
    if dtype != "auto":
        return dtype or "float32"
    name, why = auto_format(checkpoint_dtype, device)
    log.info("dtype auto: %s (%s)", name, why)
    return name
