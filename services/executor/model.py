"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) as plain tensor math.

Parameter names follow Hugging Face, except that q/k/v and gate/up are fused
(`qkv_proj`, `gate_up_proj`); `weights.py` builds them from the checkpoint.
The linear layers are `Projection`s, which run in the weight format chosen at
load time (float, or int8 / float16 weights packed for the CPU).
Attention goes through an `AttentionBackend` over the paged KV cache, so the
model knows nothing about requests: it maps a flat batch of tokens to hidden
states.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from llmesh.kernels import cpu_fused_ops
from llmesh.services.executor.attention import AttentionBackend, AttentionMetadata
from llmesh.services.executor.model_config import ModelConfig, RopeScaling
from llmesh.services.executor.projection import Projection


KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def use_kernels(x: torch.Tensor) -> bool:
    """Half-precision activations on a GPU: the fused CUDA kernels (kernels/fused.cu)
    do the norms, the residual adds, RoPE and SiLU-and-mul, one launch each."""
    return x.is_cuda and x.dtype in KERNEL_DTYPES


def fused_ops_for(x: torch.Tensor, cpu_fits: bool = True):
    """The fused element-wise ops for these activations (one module, one API): the CUDA
    kernels for half precision on a GPU, the C++ ones (kernels/cpu_fused_ops.py) for
    bfloat16 rows on a CPU where the widths fit them (`cpu_fits`); None: torch's ops."""
    if x.dim() != 2:
        return None
    if use_kernels(x):
        from llmesh.kernels import fused_ops
        return fused_ops
    return cpu_fused_ops if cpu_fits and cpu_fused_ops.usable(x) else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`: (norm(x + residual), x + residual), the decoder's
        residual add and the next norm (in place, one kernel, on a GPU)."""
        fused_ops = fused_ops_for(x, x.shape[-1] % 16 == 0)
        if fused_ops is not None:
            if residual is None:
                return fused_ops.rms_norm(x, self.weight, self.eps)
            fused_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        if residual is not None:
            residual = x + residual
            return self.norm(residual), residual
        return self.norm(x)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op, same result
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # half precision: normalise in float32 (the same fused op), scale after the cast (as HF)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    old_len = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > old_len / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    blend = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - blend) * slowed / scaling.factor + blend * slowed
    in_band = (wavelen >= old_len / scaling.high_freq_factor) & (wavelen <= old_len / scaling.low_freq_factor)
    return torch.where(in_band, blended, slowed)


def rope_tables(config: ModelConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin tables `[max_positions, head_dim]` in float32."""
    inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling).to(device)
    positions = torch.arange(config.max_position_embeddings, device=device).float()
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class Rotary:
    """A step's rotary inputs: its positions and the float32 tables; the per-token
    cos / sin rows (`[num_tokens, 1, head_dim]` in the activations' dtype) are
    gathered once, for the layers that use torch's ops rather than the kernel."""

    def __init__(self, positions: torch.Tensor, table_cos: torch.Tensor,
                 table_sin: torch.Tensor, dtype: torch.dtype):
        self.positions, self.table_cos, self.table_sin = positions, table_cos, table_sin
        self.dtype = dtype
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None:
            self._rows = (self.table_cos[self.positions].to(self.dtype).unsqueeze(1),
                          self.table_sin[self.positions].to(self.dtype).unsqueeze(1))
        return self._rows


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [num_tokens, heads, head_dim]; cos/sin: [num_tokens, 1, head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        self.qkv_proj = Projection(config.hidden_size, config.q_size + 2 * config.kv_size,
                                   bias=config.qkv_bias)
        self.o_proj = Projection(config.q_size, config.hidden_size)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, x, rotary: Rotary, kv_cache, meta: AttentionMetadata,
                backend: AttentionBackend):
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        v = qkv[:, q_size + kv_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.config.qk_norm:
            q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = self.q_norm(q.view(num_tokens, self.num_heads, self.head_dim))
            k = self.k_norm(k.view(num_tokens, self.num_kv_heads, self.head_dim))
            q, k = apply_rope(q, *rotary.rows()), apply_rope(k, *rotary.rows())
        elif (fused_ops := fused_ops_for(qkv, self.head_dim % 32 == 0 and self.head_dim <= 256)):
            # query and key heads rotated in place, one kernel
            fused_ops.rope_neox_(qkv, rotary.positions, rotary.table_cos, rotary.table_sin,
                                 self.num_heads + self.num_kv_heads, self.head_dim)
            q = qkv[:, :q_size].view(num_tokens, self.num_heads, self.head_dim)
            k = qkv[:, q_size:q_size + kv_size].view(num_tokens, self.num_kv_heads, self.head_dim)
        else:  # query and key heads rotated in one pass
            qk = apply_rope(qkv[:, :q_size + kv_size].view(
                num_tokens, self.num_heads + self.num_kv_heads, self.head_dim), *rotary.rows())
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        k_cache, v_cache = kv_cache
        backend.write_kv(k_cache, v_cache, k, v, meta)
        out = backend.attend(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = Projection(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = Projection(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        fused_ops = fused_ops_for(gate_up, gate_up.shape[-1] % 32 == 0)
        if fused_ops is not None:
            return self.down_proj(fused_ops.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, rotary, kv_cache, meta, backend):
        """(x, residual) -> (this layer's MLP output, the residual stream before it):
        each residual add is fused into the norm after it (the next layer's input
        norm, or the final norm). `residual` None: x is the embedding."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rotary, kv_cache, meta, backend)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # given its (uninitialised) weight: a random init on the meta device imports
        # torch._dynamo, 1.3 s of every start
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=torch.empty(
            config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """Token ids + positions of a flat batch -> hidden states; hidden -> logits."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = Projection(config.hidden_size, config.vocab_size)
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    def init_rope(self, device: torch.device) -> None:
        self.rope_cos, self.rope_sin = rope_tables(self.config, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        # input_ids, positions: [num_tokens] -> hidden: [num_tokens, hidden_size]
        x = self.model.embed_tokens(input_ids)
        rotary = Rotary(positions, self.rope_cos, self.rope_sin, x.dtype)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, rotary, kv_cache, meta, backend)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [num_rows, hidden_size] -> [num_rows, vocab_size] float32
        return self.lm_head(hidden).float()
