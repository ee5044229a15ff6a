"""A benchmark-only stand-in for a model whose forward takes a fixed time.

It measures what the mesh adds per step: on this CPU box a real forward is
either far shorter than a GPU step (the tiny model) or far longer (the bench
model), so a forward that sleeps `step_s` (no CPU used) stands in for a GPU
step of that length. It plugs into the ModelRunner as a model does, with KV
caches of one element per slot, and its greedy token is a fixed function of
the input token, so the scheduler sees ordinary outputs.

It keeps the host honest: what the host does around a GPU step (the plan's
diffs, the step's inputs and block tables, the sampling rows, reading tokens
back, the bookkeeping) runs as it would there, and what a GPU would do on the
device costs the host next to nothing. So its attention inputs are the GPU
kernels' (block tables and context lengths, `attention_backend`), not the CPU
reference backend's masks, and its logits cover only the first
`2 * STAND_IN_VOCAB` ids (sampling them is a few microseconds, like launching
the sampler on a GPU), not a host-side one-hot over the whole vocabulary. Its
tokens are ids `STAND_IN_VOCAB` to `2 * STAND_IN_VOCAB - 1`: never the special
ids (EOS, BOS, padding) at the start of a vocabulary.
"""
from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from llmesh.services.executor.model_config import ModelConfig


STAND_IN_VOCAB = 64  # how many ids its tokens take (from STAND_IN_VOCAB on)


class _Attention:
    num_kv_heads = 1


class BlockTableInputs:
    """The attention inputs the GPU kernels take (block tables, context lengths)
    are built for each step; nothing reads them (the forward sleeps)."""

    wants_block_tables = True


class _Layer:
    self_attn = _Attention()


class _Body:
    def __init__(self, num_layers: int):
        self.embed_tokens = nn.Embedding(1, 1)  # (the runner reads its dtype)
        self.layers = [_Layer() for _ in range(num_layers)]


class SleepModel(nn.Module):
    def __init__(self, config: ModelConfig, step_s: float):
        super().__init__()
        # one layer of 1-element KV slots: the runner allocates almost nothing
        self.config = dataclasses.replace(config, num_layers=1, num_kv_heads=1, head_dim=1,
                                          sliding_window=None)
        self.model = _Body(1)
        self.step_s = step_s
        self.attention_backend = BlockTableInputs()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta,
                backend) -> torch.Tensor:
        time.sleep(self.step_s)
        return input_ids.float().unsqueeze(-1)  # [num_tokens, 1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # the next token is STAND_IN_VOCAB + (token * 31 + 7) mod STAND_IN_VOCAB:
        # [num_rows, 2 * STAND_IN_VOCAB]
        nxt = STAND_IN_VOCAB + (hidden[:, 0].long() * 31 + 7) % STAND_IN_VOCAB
        return torch.nn.functional.one_hot(nxt, 2 * STAND_IN_VOCAB).float()
