"""A benchmark-only stand-in for a model whose forward takes a fixed time.

It measures what the mesh adds per step: on this CPU box a real forward is
either far shorter than a GPU step (the tiny model) or far longer (the bench
model), so a forward that sleeps `step_s` (no CPU used) stands in for a GPU
step of that length. It plugs into the ModelRunner as a model does, with KV
caches of one element per slot, and its greedy token is a fixed function of
the input token, so the scheduler sees ordinary outputs.
"""
from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from llmesh.services.executor.model_config import ModelConfig


class _Attention:
    num_kv_heads = 1


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
        self.vocab_size = config.vocab_size

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta,
                backend) -> torch.Tensor:
        time.sleep(self.step_s)
        return input_ids.float().unsqueeze(-1)  # [num_tokens, 1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # the next token is (token * 31 + 7) mod vocab: [num_rows, vocab_size]
        nxt = (hidden[:, 0].long() * 31 + 7) % self.vocab_size
        return torch.nn.functional.one_hot(nxt, self.vocab_size).float()
