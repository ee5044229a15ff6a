"""A step's host-built integer inputs, moved to the device in one copy.

The runner and the attention metadata put their arrays (token ids, positions,
slot mapping, block tables, context lengths) here as numpy arrays built with
vectorised code; `flush` makes them device tensors. On a GPU they are packed
into a persistent pinned slab and copied with one non-blocking host-to-device
copy, so nothing in the step waits for the copy; two slabs alternate, and a
slab is refilled only after the copy that last read it has completed (a CUDA
event), so the host can prepare step N+1 while step N's copy is in flight. On
the CPU the arrays become tensors without a copy.
"""
from __future__ import annotations

import numpy as np
import torch

_TORCH_DTYPES = {np.dtype(np.int64): torch.long, np.dtype(np.int32): torch.int32}


class Staged:
    """One array put for the next flush; `tensor` is its device tensor after it."""

    __slots__ = ("array", "tensor")

    def __init__(self, array: np.ndarray):
        self.array = array
        self.tensor: torch.Tensor | None = None


class Staging:
    def __init__(self, device: torch.device | str, num_slabs: int = 2):
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"
        self._slabs: list[torch.Tensor | None] = [None] * num_slabs
        self._events: list = [None] * num_slabs
        self._next = 0
        self._pending: list[Staged] = []
        self.num_copies = 0  # host-to-device copies made (one per flush on a GPU)

    def put(self, array: np.ndarray) -> Staged:
        """`array` (int64 or int32, 1-D or 2-D) for the next flush."""
        if array.dtype not in _TORCH_DTYPES:
            raise TypeError(f"staging takes int64 or int32 arrays, not {array.dtype}")
        staged = Staged(np.ascontiguousarray(array))
        self._pending.append(staged)
        return staged

    def flush(self) -> None:
        """Every array put since the last flush, on the device now (as far as the
        stream is concerned: on a GPU the copy is queued, not waited for)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        if not self.pinned:
            for s in pending:
                s.tensor = torch.from_numpy(s.array).to(self.device)
            return
        sizes = [s.array.size for s in pending]
        slab = self._slab(sum(sizes))
        host = slab.numpy()
        offset = 0
        for s, n in zip(pending, sizes):
            host[offset:offset + n] = s.array.reshape(-1)
            offset += n
        dev = slab[:offset].to(self.device, non_blocking=True)
        self._events[self._next].record()
        self._next = (self._next + 1) % len(self._slabs)
        self.num_copies += 1
        offset = 0
        for s, n in zip(pending, sizes):
            t = dev[offset:offset + n].view(s.array.shape)
            s.tensor = t if s.array.dtype == np.int64 else t.to(_TORCH_DTYPES[s.array.dtype])
            offset += n

    def _slab(self, numel: int) -> torch.Tensor:
        """The next pinned slab, once the copy that last read it is done; grown to
        the next power of two when too small."""
        i = self._next
        if self._events[i] is None:
            self._events[i] = torch.cuda.Event()
        else:
            self._events[i].synchronize()
        slab = self._slabs[i]
        if slab is None or slab.numel() < numel:
            size = 1 << max(12, (numel - 1).bit_length())
            slab = self._slabs[i] = torch.empty(size, dtype=torch.long, pin_memory=True)
        return slab
