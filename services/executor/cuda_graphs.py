"""Decode steps replayed from CUDA graphs, one per padded batch size.

A decode step at batch 64 of a 1B model is ~500 kernel launches; launched
from Python one by one, the host sets the pace (issue 14: 19 ms a step for
3.3 ms of GPU work). Captured once into a CUDA graph, the whole forward is one
launch.

A graph replays fixed addresses and a fixed launch geometry, so:
- The model reads its inputs from static buffers sized for the largest batch:
  token ids, positions, slot mapping, block tables `[max_batch, max_blocks]`
  (every block a `max_model_len` sequence can hold) and context lengths. A step
  copies its inputs into them (device to device, after the step's one
  host-to-device copy) and replays the smallest graph that fits.
- Rows past the step's batch are padding: slot -1 (the cache write skips it)
  and context 1 (attention reads one valid key of block 0); their outputs are
  ignored. Matmuls and norms are row-wise, so padding changes no real row.
- The decode kernel's split count is fixed per graph (from `max_model_len`),
  and each sequence divides its own context among the splits in the kernel.

Only decode-only steps (one query per sequence, the kernel backend) replay
graphs; prefill and mixed steps run eagerly. Graphs share one memory pool: they
never run concurrently, and a step's hidden states are consumed (sampled) before
the next replay overwrites them.
"""
from __future__ import annotations

import logging
import time

import torch

from llmesh.services.executor.attention import AttentionMetadata

log = logging.getLogger("llmesh.executor")


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The padded batch sizes to capture: 1, 2, 4, 8, then every multiple of 16,
    and `max_batch` itself."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model, kv_caches, backend, max_batch: int, max_model_len: int,
                 block_size: int, device: torch.device, sizes: list[int] | None = None):
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.sizes = sorted(sizes or graph_batch_sizes(max_batch))
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        big = self.sizes[-1]
        self.input_ids = torch.zeros(big, dtype=torch.int64, device=device)
        self.positions = torch.zeros(big, dtype=torch.int64, device=device)
        self.slots = torch.full((big,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(big, self.max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(big, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.capture_s = 0.0
        self.num_replays = 0

    def fits(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """A decode-only step this graph set can replay."""
        return (meta.num_single == num_tokens and num_tokens <= self.sizes[-1]
                and meta.single_block_tables is not None
                and meta.single_block_tables.shape[1] <= self.max_blocks)

    def capture_all(self) -> None:
        """Capture every batch size, largest first (the shared pool then holds the
        largest activations once)."""
        t0 = time.perf_counter()
        for size in reversed(self.sizes):
            self._capture(size)
        self.capture_s = time.perf_counter() - t0
        log.info("captured %d decode graphs (batch %d..%d) in %.2f s", len(self.sizes),
                 self.sizes[0], self.sizes[-1], self.capture_s)

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states `[num_tokens, hidden]` of a step that `fits`."""
        n = input_ids.shape[0]
        size = next(b for b in self.sizes if b >= n)
        if size not in self._graphs:
            self._capture(size)
        graph, hidden = self._graphs[size]
        width = meta.single_block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(meta.positions)
        self.slots[:n].copy_(meta.slot_mapping)
        self.block_tables[:n, :width].copy_(meta.single_block_tables)
        self.context_lens[:n].copy_(meta.single_context_lens)
        if size > n:  # rows an earlier, larger step left: padding again
            self.slots[n:size].fill_(-1)
            self.context_lens[n:size].fill_(1)
        graph.replay()
        self.num_replays += 1
        return hidden[:n]

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:size], positions=self.positions[:size], num_single=size,
            single_block_tables=self.block_tables[:size],
            single_context_lens=self.context_lens[:size], max_single_context=self.max_model_len)

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_caches,
                          self._meta(size), self.backend)

    def _capture(self, size: int) -> None:
        # the static buffers hold padding only (slots -1): the warm-up writes no KV
        self.slots[:size].fill_(-1)
        self.context_lens[:size].fill_(1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: kernels compiled, cuBLAS set up
            self._forward(size)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            hidden = self._forward(size)
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[size] = (graph, hidden)
