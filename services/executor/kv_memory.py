"""How many KV blocks a CPU executor gets when none are configured.

A share of the memory still available once the weights are loaded and a
profiling forward of a full token budget has run (its peak is the activations'
reservation), capped at what the scheduler could ever fill: `max_num_seqs`
sequences of `max_model_len` tokens. "Available" is the smaller of the kernel's
MemAvailable and what this process's cgroup still allows, so a container's
limit is respected. An explicit block count or byte size always wins.
"""
from __future__ import annotations

import logging
import math
import mmap
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (the scheduler reads kv_cap_blocks: it must not load torch for that)
    import torch

log = logging.getLogger("llmesh.executor")

DEFAULT_KV_MEMORY_SHARE = 0.5


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def available_memory_bytes(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")
                           ) -> int:
    """Bytes this process could still allocate without swapping or being killed."""
    available = None
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if available is None:
        raise RuntimeError("cannot read MemAvailable from /proc/meminfo; set num_kv_blocks")
    for limit_file, usage_file in (("memory.max", "memory.current"),  # cgroup v2
                                   ("memory/memory.limit_in_bytes",
                                    "memory/memory.usage_in_bytes")):  # v1
        limit, usage = _read_int(cgroup / limit_file), _read_int(cgroup / usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            available = min(available, max(0, limit - usage))
            break
    return available


def kv_cap_blocks(max_num_seqs: int, max_model_len: int, block_size: int) -> int:
    """The most blocks the scheduler could ever fill: every slot at full context."""
    return max_num_seqs * -(-max_model_len // block_size)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@dataclass(frozen=True)
class KVSizing:
    num_blocks: int
    available_bytes: int
    activation_bytes: int
    share: float
    cap_blocks: int

    def describe(self, per_block: int) -> str:
        return (f"KV cache: {self.num_blocks} blocks ({self.num_blocks * per_block / 2**20:.0f} "
                f"MiB) = min({self.share:g} x {self.available_bytes / 2**30:.2f} GiB available "
                f"after the weights and {self.activation_bytes / 2**20:.0f} MiB of activations, "
                f"{self.cap_blocks} blocks for max_num_seqs x max_model_len)")


def size_kv_cache(per_block: int, cap_blocks: int, share: float = DEFAULT_KV_MEMORY_SHARE,
                  activation_bytes: int = 0, available: int | None = None) -> KVSizing:
    """Blocks for `share` of the available memory (default: measured now) less the
    activations' reservation."""
    if available is None:
        available = available_memory_bytes()
    budget = share * max(0, available - activation_bytes)
    blocks = max(1, min(cap_blocks, int(budget // per_block)))
    sizing = KVSizing(blocks, available, activation_bytes, share, cap_blocks)
    log.info(sizing.describe(per_block))
    return sizing


def kv_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed KV tensor. On the CPU it lies in an anonymous memory map, so its pages
    are committed as blocks are first written: resident memory grows with the blocks
    used, not with the capacity, and making it costs nothing however large it is."""
    import torch
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if num_bytes == 0:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, num_bytes)  # the tensor keeps the map alive
    return torch.frombuffer(buf, dtype=dtype).view(shape)
