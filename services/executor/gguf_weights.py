"""Tensors of a GGUF file under Hugging Face names, dequantized as they are read.

The file is memory-mapped (gguf's reader); a tensor is dequantized to float32
only when the loader asks for it, so peak memory is the model in the target
dtype plus one tensor. llama.cpp's converter stores a Llama's q and k
projections with their rows permuted for its interleaved RoPE; they are put back
in the order of the Hugging Face checkpoint, which the model's rotate-half RoPE
expects.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from llmesh.services.common.errors import UnsupportedModelError
from llmesh.services.common.gguf_reader import GGUFFile

_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    m = _LAYER_NAME.match(hf_name)
    if m is None or m.group(2) not in _LAYER:
        raise UnsupportedModelError(f"no GGUF tensor for {hf_name!r}")
    return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row order for interleaved RoPE: within each head it
    stores row pairs (i, i + half) next to each other; the checkpoint has the halves."""
    rows = w.shape[0]
    half = rows // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFTensors:
    """The same interface as SafetensorsIndex (`in`, get, get_slice, close)."""

    def __init__(self, path: str | Path, arch: str, num_heads: int, num_kv_heads: int):
        self.file = GGUFFile(path)
        self.arch = arch
        self.num_heads = {"attn_q": num_heads, "attn_k": num_kv_heads}

    def __contains__(self, name: str) -> bool:
        try:
            return gguf_name(name) in self.file.tensors
        except UnsupportedModelError:
            return False

    def get(self, name: str) -> torch.Tensor:
        from gguf import GGMLQuantizationType, dequantize
        key = gguf_name(name)
        if key not in self.file.tensors:
            raise UnsupportedModelError(f"GGUF file has no tensor {key!r} (for {name!r})")
        type_id = self.file.tensors[key].type_id
        if type_id not in GGMLQuantizationType._value2member_map_:
            raise UnsupportedModelError(f"GGUF tensor {key!r}: unknown quant type id {type_id}")
        qtype = GGMLQuantizationType(type_id)
        info, raw = self.file.raw(key)
        try:
            data = dequantize(raw, qtype)
        except NotImplementedError:  # (gguf reads most types; a few it cannot dequantize)
            raise UnsupportedModelError(f"GGUF tensor {key!r}: quant type {qtype.name} "
                                        "is not supported") from None
        # GGML lists dimensions fastest first; numpy's order is the reverse
        data = np.asarray(data).reshape(info.dims[::-1])
        kind = key.split(".")[2] if key.startswith("blk.") else ""
        if self.arch == "llama" and kind in self.num_heads:
            data = unpermute_rope_rows(data, self.num_heads[kind])
        return torch.from_numpy(np.array(data, dtype=np.float32))  # a copy: the map is read-only

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        full = self.get(name)
        return (full[start:stop] if dim == 0 else full[:, start:stop]).clone()

    def close(self) -> None:
        self.file = None
