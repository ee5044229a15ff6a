"""A step's host-built inputs, moved to the device in one copy.

The runner, the attention metadata and the sampler put their arrays (token
ids, positions, slot mapping, block tables, context lengths, sampling
parameters and noise keys) here as numpy arrays built with vectorised code;
`flush` makes them device tensors. On a GPU their bytes are packed
into a persistent pinned slab and copied with one non-blocking host-to-device
copy, so nothing in the step waits for the copy; two slabs alternate, and a
slab is refilled only after the copy that last read it has completed (a CUDA
event), so the host can prepare step N+1 while step N's copy is in flight. On
the CPU the arrays become tensors without a copy.
"""
from __future__ import annotations

import numpy as np
import torch

_TORCH_DTYPES = {np.dtype(t): getattr(torch, t) for t in
                 ("int64", "int32", "float32", "float64", "bool")}
_ALIGN = 8  # every array starts at a multiple of this many bytes of the slab


class Staged:
    """One array put for the next flush; `tensor` is its device tensor after it."""

    __slots__ = ("array", "tensor")

    def __init__(self, array: np.ndarray):
        self.array = array
        self.tensor: torch.Tensor | None = None


class Staging:
    def __init__(self, device: torch.device | str, num_slabs: int = 2, pack: bool | None = None):
        """`pack` (default: on a GPU) packs the arrays into a slab and copies it once;
        off a GPU the slab is not pinned and the copy is a plain one (so that the
        packing runs, and is tested, on the CPU too)."""
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"
        self.pack = self.pinned if pack is None else pack
        self._slabs: list[torch.Tensor | None] = [None] * num_slabs
        self._events: list = [None] * num_slabs
        self._next = 0
        self._pending: list[Staged] = []
        self.num_copies = 0  # host-to-device copies made (one per flush on a GPU)

    def put(self, array: np.ndarray) -> Staged:
        """`array` (int64, int32, float32, float64 or bool; any shape) for the next flush."""
        if array.dtype not in _TORCH_DTYPES:
            raise TypeError(f"staging takes int64, int32, float32, float64 or bool arrays, "
                            f"not {array.dtype}")
        staged = Staged(np.ascontiguousarray(array))
        self._pending.append(staged)
        return staged

    def flush(self) -> None:
        """Every array put since the last flush, on the device now (as far as the
        stream is concerned: on a GPU the copy is queued, not waited for)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        if not self.pack:
            for s in pending:
                s.tensor = torch.from_numpy(s.array).to(self.device)
            return
        sizes = [-(-s.array.nbytes // _ALIGN) * _ALIGN for s in pending]
        slab = self._slab(sum(sizes))
        host = slab.numpy()
        offset = 0
        for s, n in zip(pending, sizes):
            host[offset:offset + s.array.nbytes] = s.array.reshape(-1).view(np.uint8)
            offset += n
        if self.pinned:
            dev = slab[:offset].to(self.device, non_blocking=True)
            self._events[self._next].record()
        else:
            dev = slab[:offset].clone()
        self._next = (self._next + 1) % len(self._slabs)
        self.num_copies += 1
        offset = 0
        for s, n in zip(pending, sizes):
            raw = dev[offset:offset + s.array.nbytes]
            s.tensor = raw.view(_TORCH_DTYPES[s.array.dtype]).view(s.array.shape)
            offset += n

    def _slab(self, numel: int) -> torch.Tensor:
        """The next pinned slab (bytes), once the copy that last read it is done;
        grown to the next power of two when too small."""
        i = self._next
        if self.pinned and self._events[i] is None:
            self._events[i] = torch.cuda.Event()
        elif self.pinned:
            self._events[i].synchronize()
        slab = self._slabs[i]
        if slab is None or slab.numel() < numel:
            size = 1 << max(12, (numel - 1).bit_length())
            slab = self._slabs[i] = torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)
        return slab
