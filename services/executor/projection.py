"""The model's linear layers (q/k/v, o, gate/up, down, LM head) and the weight
formats they run in.

Every projection is loaded as a plain float weight. `pack_projections` then
converts it, once, to the format the model was asked for:

- `float32` / `bfloat16` / `float16`: the weight stays as loaded (`F.linear`).
- `int8` (CPU): weights quantized per output channel (symmetric, scale =
  max |w| / 127), packed for fbgemm; activations quantized per token, products
  accumulated in int32, output float32. A quarter of the float32 weight bytes:
  decode on a CPU is bound by reading them. fbgemm's dynamic linear quantizes
  its whole input with one scale, which would make a token's result depend on
  what else is in the batch (one loud row coarsens every other row's
  rounding). So each row is divided by its own max |x| first, and a fixed
  anchor row [1, -1, 0, ...] joins the batch, which pins the input's range to
  [-1, 1]: the quantization is then per token and the same whatever the batch
  holds (batch-invariant bit for bit), and each output row is scaled back.
- `float16-weights` (CPU): weights stored as float16, packed for fbgemm, and
  widened inside the kernel; activations and outputs stay float32. Half the
  bytes with rounding error near float16's (about 1e-4 relative).

Both packed formats need fbgemm (x86 CPUs with AVX2). Activations, the KV
cache, norms and embeddings stay float32 in both.

`bfloat16` on a CPU with bfloat16 instructions (AVX512-BF16 or AMX): each weight is
reordered once into oneDNN's blocked layout (`prepack_bfloat16`), which its
matrix-vector product reads at about twice the speed of the plain layout (bench
model at batch 1: 2.1 against 3.8-4.8 ms a forward's projections, one thread or
two; `benchmarks/results/cpu-decode/bf16-prepack-microbench.log`), bit for bit the
same results as `F.linear`, and each row's result independent of the batch.
"""
from __future__ import annotations

import threading
import warnings

import torch
from torch import nn
import torch.nn.functional as F

from llmesh.services.common.errors import UnsupportedModelError

PACKED_FORMATS = ("int8", "float16-weights")
# float32 on a CPU through oneDNN's linear, not F.linear's BLAS call: on the bench
# box (AMD EPYC, torch's MKL) F.linear read the bench model's weights at about 18 GB/s
# at batch 1 with one thread or two, oneDNN at 38.6 GB/s on two, and 1.9-2.3x
# faster at batch 1 to 256 (benchmarks/results/cpu-decode/linear-microbench.log)
ONEDNN_FLOAT32 = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                   "_linear_pointwise")


def onednn_bfloat16() -> bool:
    """Whether this CPU and torch build run oneDNN's prepacked bfloat16 linear."""
    return (ONEDNN_FLOAT32 and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Projection(nn.Module):
    """`x @ weight.T + bias`, in this layer's weight format."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.format = "float"  # or the PACKED_FORMATS name it was converted to
        self.kernel: _Int8PerToken | _Float16Weights | None = None  # once packed
        self.blocked: torch.Tensor | None = None  # bfloat16 in oneDNN's layout, once reordered
        # bfloat16 in the CPU decode kernel's layout (services/executor/cpu_decode_step.py),
        # kept beside oneDNN's when that kernel runs the model's small decode steps
        self.decode_rows: torch.Tensor | None = None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocked is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.blocked, self.bias, "none", [], "")
        if self.kernel is None:
            if x.dtype == torch.float32 and ONEDNN_FLOAT32 and x.device.type == "cpu":
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            return F.linear(x, self.weight, self.bias)
        out = self.kernel.run(x.reshape(-1, x.shape[-1]).float())
        return out.view(*x.shape[:-1], out.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x)

    def pack(self, fmt: str) -> None:
        """Convert the loaded weight to `fmt` (a PACKED_FORMATS name) and drop it."""
        w = self.weight.detach().float().contiguous()
        b = None if self.bias is None else self.bias.detach().float().contiguous()
        if fmt == "int8":
            self.kernel = _Int8PerToken(w, b)
        elif fmt == "float16-weights":
            self.kernel = _Float16Weights(w, b)
        else:
            raise UnsupportedModelError(f"unknown weight format {fmt!r}")
        self.format = fmt
        # the layer no longer reads its float weight (a tied LM head's stays the embedding's)
        self.weight = None
        self.bias = None

    def reorder_bfloat16(self) -> None:
        """Keep the bfloat16 weight only in oneDNN's blocked layout (the hint is batch 1:
        decode; every batch size runs on it)."""
        self.blocked = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)
        self.weight = None  # (a tied LM head's stays the embedding's)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.format}"


class _Float16Weights:
    def __init__(self, w: torch.Tensor, b: torch.Tensor | None):
        self.packed = torch.ops.quantized.linear_prepack_fp16(w, b)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


_scratch = threading.local()  # per thread: width -> [1 + rows, width] rows buffer


def _anchored_rows(n: int, width: int) -> torch.Tensor:
    """A buffer whose row 0 is the anchor [1, -1, 0, ...], with room for n rows after it."""
    buffers = _scratch.__dict__.setdefault("rows", {})
    buf = buffers.get(width)
    if buf is None or buf.shape[0] < n + 1:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of it
            buf = torch.zeros(max(n + 1, 2 * (buf.shape[0] if buf is not None else 8)), width)
            buf[0, 0], buf[0, 1] = 1.0, -1.0
        buffers[width] = buf
    return buf


class _Int8PerToken:
    """fbgemm's int8 dynamic linear with per-token activation scales (see above)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None):
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
        with warnings.catch_warnings():  # torch 2.13 marks quantized tensors deprecated
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long),
                                           0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(q, None)
        self.bias = b

    def run(self, x: torch.Tensor) -> torch.Tensor:
        n, width = x.shape
        rows = _anchored_rows(n, width)
        scale = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).clamp_min_(1e-30)
        torch.div(x, scale, out=rows[1:n + 1])
        # 7-bit activations (reduce_range): no int16 overflow in AVX2's multiply-add
        out = torch.ops.quantized.linear_dynamic(rows[:n + 1], self.packed, True)[1:]
        out.mul_(scale)
        return out if self.bias is None else out.add_(self.bias)


def check_packed_format(fmt: str, device: torch.device) -> None:
    if device.type != "cpu":
        raise UnsupportedModelError(f"dtype {fmt!r} runs on CPU only; on {device.type} "
                                    "use bfloat16 or float16")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise UnsupportedModelError(f"dtype {fmt!r} needs fbgemm (an x86 CPU with AVX2), "
                                    "which this torch build or CPU lacks; use float32")


def pack_projections(model: nn.Module, fmt: str) -> int:
    """Convert every projection of `model` to `fmt`; returns how many."""
    check_packed_format(fmt, next(model.parameters()).device)
    layers = [m for m in model.modules() if isinstance(m, Projection)]
    for layer in layers:
        layer.pack(fmt)
    return len(layers)


def prepack_bfloat16(model: nn.Module) -> int:
    """Reorder every bfloat16 projection of a CPU model for oneDNN; how many (0 where
    the CPU has no bfloat16 instructions: `F.linear` then)."""
    layers = [m for m in model.modules() if isinstance(m, Projection) and m.kernel is None
              and m.weight is not None and m.weight.dtype == torch.bfloat16
              and m.weight.device.type == "cpu"]
    if not layers or not onednn_bfloat16():
        return 0
    for layer in layers:
        layer.reorder_bfloat16()
    return len(layers)


def projection_bytes(model: nn.Module) -> int:
    """Bytes the projections' weights take in their current format."""
    total = 0
    for m in model.modules():
        if not isinstance(m, Projection):
            continue
        if m.weight is not None:
            total += m.weight.numel() * m.weight.element_size()
        else:
            total += m.in_features * m.out_features * (1 if m.format == "int8" else 2)
    return total
