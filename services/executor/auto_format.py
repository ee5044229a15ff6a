"""What `dtype: auto` runs a model in on this machine.

On a GPU: the checkpoint's own dtype. On a CPU: bfloat16 when the CPU has
bfloat16 instructions (AVX512-BF16 or AMX) and torch's oneDNN runs them: the
projections then read half the bytes of float32 through oneDNN's prepacked
bfloat16 linear (services/executor/projection.py). On the bench box (an AMD
EPYC with AVX512-BF16, no AMX), served through the mesh, bfloat16 against float32:
single stream 6.28 against 8.82 ms a token, offline 465 against 390 tokens/s
(BENCHMARKS.md, "CPU decode"). Before the weights were prepacked and single
queries attended in float32, bfloat16 was the slower of the two there. float32
elsewhere (oneDNN's float32 linear). The packed `float16-weights` format is not
chosen: it needs fbgemm, and it was not measured against oneDNN's float32.
Quality per format on the trained model is in BENCHMARKS.md ("Quality on a
trained model").
"""
from __future__ import annotations

import logging

import torch

from llmesh.kernels.cpu_decode import cpu_flags
from llmesh.services.executor.projection import onednn_bfloat16

log = logging.getLogger("llmesh.executor")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def auto_format(checkpoint_dtype: str, device: str | torch.device) -> tuple[str, str]:
    """(the format, why) for `dtype: auto` on `device`."""
    if torch.device(device).type != "cpu":
        return checkpoint_dtype, f"the checkpoint's dtype on {torch.device(device).type}"
    found = sorted(cpu_flags() & set(BF16_FLAGS))
    if found and onednn_bfloat16():
        return "bfloat16", f"this CPU has {', '.join(found)}: oneDNN's prepacked bfloat16 linear"
    return "float32", "this CPU has no bfloat16 instructions (avx512_bf16, amx_bf16): float32"


def resolve_format(checkpoint_dtype: str, dtype: str | None, device: str | torch.device) -> str:
    """`dtype` as asked (float32 when unset), or auto's choice, logged."""
    if dtype != "auto":
        return dtype or "float32"
    name, why = auto_format(checkpoint_dtype, device)
    log.info("dtype auto: %s (%s)", name, why)
    return name
