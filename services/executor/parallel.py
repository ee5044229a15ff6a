"""Tensor parallelism: the process group of one replica's executor ranks, and the
sharding of a plain `CausalLM` across them.

The model code stays plain math; `shard_model` swaps its linear layers and
embeddings for the parallel modules below and narrows the attention head
counts to this rank's share:

- q/k/v and gate/up are column parallel (each rank owns a slice of the output
  features: its query heads, its KV heads, its part of the MLP);
- o_proj and down_proj are row parallel (a slice of the input features, then
  one all-reduce each: two per layer);
- the embedding and the LM head are vocab parallel (a slice of the vocabulary;
  the embedding all-reduces, the head gathers full logits on rank 0).

KV heads are sharded when there are at least as many as ranks, replicated
(one per rank, shared by the ranks whose query heads use it) when fewer.
Every sharded parameter records which checkpoint slices it is made of, so the
loader reads only those slices from the safetensors files.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import nn
import torch.distributed as dist
import torch.nn.functional as F

from llmesh.services.common.errors import UnsupportedModelError
from llmesh.services.executor.model import CausalLM
from llmesh.services.executor.model_config import ModelConfig
from llmesh.services.executor.projection import Projection


class TPGroup:
    """This rank's view of the group; times every collective it joins."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.comm_s = 0.0  # seconds spent in collectives (waiting on peers included)

    def close(self) -> None:
        """Leave the group together with the peers. A process that exits with the
        group still up can abort in its destructors ("terminate called without an
        active exception")."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        dist.all_reduce(t)
        self.comm_s += time.perf_counter() - t0
        return t

    def gather_to_first(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        t0 = time.perf_counter()
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(t, out, dst=0)
        self.comm_s += time.perf_counter() - t0
        return out

    def broadcast_tokens(self, tokens: list[int] | None, count: int, device) -> list[int]:
        """Rank 0's sampled tokens to every rank (they extend each rank's sequences)."""
        t0 = time.perf_counter()
        buf = (torch.tensor(tokens, dtype=torch.long, device=device) if self.rank == 0
               else torch.empty(count, dtype=torch.long, device=device))
        dist.broadcast(buf, src=0)
        self.comm_s += time.perf_counter() - t0
        return buf.tolist()


def init_group(rank: int, world_size: int, address: str, device: str = "cpu",
               timeout_s: float = 60.0) -> TPGroup:
    """Join the replica's process group (gloo on CPU, NCCL on CUDA); rank 0 hosts the store."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    return TPGroup(rank, world_size)


# --- how a model splits ------------------------------------------------------------

def check_shardable(config: ModelConfig, world_size: int) -> None:
    problems = []
    if config.num_heads % world_size:
        problems.append(f"{config.num_heads} attention heads")
    if config.intermediate_size % world_size:
        problems.append(f"intermediate size {config.intermediate_size}")
    kv = config.num_kv_heads
    if (kv >= world_size and kv % world_size) or (kv < world_size and world_size % kv):
        problems.append(f"{kv} KV heads")
    if problems:
        raise UnsupportedModelError(
            f"tensor_parallel={world_size} does not divide {', '.join(problems)}")


def kv_head_range(num_kv_heads: int, world_size: int, rank: int) -> tuple[int, int]:
    """(first KV head, count) this rank holds: a slice, or one replicated head."""
    if num_kv_heads >= world_size:
        per = num_kv_heads // world_size
        return rank * per, per
    return rank * num_kv_heads // world_size, 1


@dataclass(frozen=True)
class Slice:
    """Rows (dim 0) or columns (dim 1) [start, stop) of one checkpoint tensor."""
    dim: int
    start: int
    stop: int


class ColumnParallelLinear(Projection):
    """Output features = the concatenation of this rank's slice of each fused part."""

    def __init__(self, in_features: int, row_slices: list[tuple[int, int]], bias: bool):
        super().__init__(in_features, sum(stop - start for start, stop in row_slices), bias)
        parts = [Slice(0, start, stop) for start, stop in row_slices]
        self.shard_slices = {"weight": parts, "bias": parts}


class RowParallelLinear(Projection):
    """This rank's slice of the input features; partial sums all-reduced."""

    def __init__(self, in_start: int, in_stop: int, out_features: int, group: TPGroup):
        super().__init__(in_stop - in_start, out_features)
        self.shard_slices = {"weight": [Slice(1, in_start, in_stop)]}
        self.group = group

    def forward(self, x):
        return self.group.all_reduce(self.project(x))


def vocab_range(vocab_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """Equal shards of ceil(vocab / ranks) rows; the last one padded past the vocabulary."""
    per = -(-vocab_size // world_size)
    return rank * per, (rank + 1) * per


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, group: TPGroup):
        super().__init__()
        self.start, self.stop = vocab_range(vocab_size, group.world_size, group.rank)
        self.weight = nn.Parameter(torch.empty(self.stop - self.start, hidden_size))
        self.shard_slices = {"weight": [Slice(0, self.start, min(self.stop, vocab_size))]}
        self.group = group

    def forward(self, ids):
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.group.all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0))


class VocabParallelHead(Projection):
    """Local logits for this rank's vocabulary slice, gathered on rank 0.

    Rank 0 gets `[rows, vocab_size]`; the other ranks get `[rows, 0]`."""

    def __init__(self, vocab_size: int, hidden_size: int, group: TPGroup):
        start, stop = vocab_range(vocab_size, group.world_size, group.rank)
        super().__init__(hidden_size, stop - start)
        self.vocab_size = vocab_size
        self.shard_slices = {"weight": [Slice(0, start, min(stop, vocab_size))]}
        self.group = group

    def forward(self, hidden):
        parts = self.group.gather_to_first(self.project(hidden))
        if parts is None:
            return hidden.new_empty(hidden.shape[0], 0)
        return torch.cat(parts, dim=-1)[:, :self.vocab_size]


def shard_model(model: CausalLM, group: TPGroup) -> CausalLM:
    """Swap `model`'s layers for this rank's parallel ones (call on the meta device,
    before loading weights)."""
    c = model.config
    world, rank = group.world_size, group.rank
    check_shardable(c, world)
    d = c.head_dim
    heads = c.num_heads // world
    q0 = rank * heads * d
    kv_first, kv_heads = kv_head_range(c.num_kv_heads, world, rank)
    k0 = kv_first * d
    inter = c.intermediate_size // world
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.num_heads, attn.num_kv_heads = heads, kv_heads
        attn.qkv_proj = ColumnParallelLinear(
            c.hidden_size, [(q0, q0 + heads * d), (k0, k0 + kv_heads * d),
                            (k0, k0 + kv_heads * d)], bias=c.qkv_bias)
        attn.o_proj = RowParallelLinear(q0, q0 + heads * d, c.hidden_size, group)
        mlp = layer.mlp
        mlp.gate_up_proj = ColumnParallelLinear(
            c.hidden_size, [(rank * inter, (rank + 1) * inter)] * 2, bias=False)
        mlp.down_proj = RowParallelLinear(rank * inter, (rank + 1) * inter, c.hidden_size, group)
    model.model.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size, group)
    model.lm_head = VocabParallelHead(c.vocab_size, c.hidden_size, group)
    model.tp_group = group
    return model


def shard_slices(model: nn.Module) -> dict[str, tuple[list[Slice], int]]:
    """Parameter name -> (checkpoint slices per fused part, rows the parameter has)."""
    out = {}
    for prefix, module in model.named_modules():
        for pname, slices in getattr(module, "shard_slices", {}).items():
            param = getattr(module, pname, None)
            if param is not None:
                out[f"{prefix}.{pname}" if prefix else pname] = (slices, param.shape[0])
    return out
