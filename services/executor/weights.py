"""Load a Hugging Face checkpoint (or a GGUF file) into `CausalLM`, reading tensors lazily.

Tensors are read one at a time from memory-mapped safetensors files (single
file or sharded with `model.safetensors.index.json`), converted to the target
dtype and assigned; the model is built on the meta device so no memory is
spent on a random initialisation.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from llmesh.services.common.errors import UnsupportedModelError
from llmesh.services.common.gguf_file import model_path
from llmesh.services.executor.auto_format import resolve_format
from llmesh.services.executor.model import CausalLM
from llmesh.services.executor.model_config import ModelConfig, load_model_config
from llmesh.services.executor.projection import (PACKED_FORMATS, check_packed_format, pack_projections,
                                                 prepack_bfloat16)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SafetensorsIndex:
    """Name -> file lookup over the checkpoint's safetensors files."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index_path = model_dir / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            self.files = {name: model_dir / f for name, f in weight_map.items()}
        else:
            paths = sorted(model_dir.glob("*.safetensors"))
            if not paths:
                raise UnsupportedModelError(f"{model_dir}: no *.safetensors weights")
            self.files = {}
            for path in paths:
                with safe_open(path, framework="pt") as f:
                    self.files.update({name: path for name in f.keys()})
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, stop) of a tensor, copied out of the
        memory-mapped file (only the pages holding them are touched for rows)."""
        sl = self._handle(name).get_slice(name)
        return (sl[start:stop] if dim == 0 else sl[:, start:stop]).clone()

    def _handle(self, name: str):
        if name not in self.files:
            raise UnsupportedModelError(f"checkpoint has no tensor {name!r}")
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def close(self) -> None:
        self._handles.clear()


def open_tensors(model_dir: Path, config: ModelConfig):
    """The checkpoint's tensors: its safetensors files, or the GGUF file its config.json
    names (a directory rendered from a GGUF file, services/common/gguf_file.py)."""
    gguf = json.loads((model_dir / "config.json").read_text()).get("gguf_file")
    if gguf:
        from llmesh.services.executor.gguf_weights import GGUFTensors
        return GGUFTensors(gguf, config.model_type, config.num_heads, config.num_kv_heads)
    return SafetensorsIndex(model_dir)


def checkpoint_names(param_name: str) -> list[str]:
    """Hugging Face tensor names that make up one of our parameters (concatenated on dim 0)."""
    for fused, parts in ((".qkv_proj.", ("q_proj", "k_proj", "v_proj")),
                         (".gate_up_proj.", ("gate_proj", "up_proj"))):
        if fused in param_name:
            return [param_name.replace(fused, f".{part}.") for part in parts]
    return [param_name]


def resolve_dtype(config: ModelConfig, dtype: str | None,
                  device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype of activations, the KV cache and unpacked weights (float32 under a
    packed weight format); `auto` as chosen for `device`'s machine."""
    name = resolve_format(config.torch_dtype, dtype, device)
    if name in PACKED_FORMATS:
        return torch.float32
    if name not in DTYPES:
        raise UnsupportedModelError(f"unsupported dtype {name!r}; choose from "
                                    f"{', '.join((*DTYPES, *PACKED_FORMATS))}")
    return DTYPES[name]


def load_model(model_dir: str | Path, dtype: str | None = "float32",
               device: str | torch.device = "cpu", tp_group=None,
               cpu_decode_kernel: bool = True) -> CausalLM:
    """Build the model for `model_dir` with weights in `dtype` on `device`; with a
    tensor-parallel group, only this rank's shard, read slice by slice. A packed
    format (`int8`, `float16-weights`) converts the linear layers once loaded.
    `cpu_decode_kernel`: a bfloat16 or float32 model on a CPU gets its weights in the
    decode kernel's layout too (bfloat16: a packed copy; float32: the weights
    themselves), where that kernel can run it (services/executor/cpu_decode_step.py).
    `model_dir` may be a GGUF file (or a directory holding one)."""
    model_dir = model_path(model_dir)
    config = load_model_config(model_dir)
    dtype = resolve_format(config.torch_dtype, dtype, device)
    torch_dtype = resolve_dtype(config, dtype, device)
    if dtype in PACKED_FORMATS:
        check_packed_format(dtype, torch.device(device))
    with torch.device("meta"):
        model = CausalLM(config)
        if tp_group is not None:
            from llmesh.services.executor.parallel import shard_model
            shard_model(model, tp_group)
    slices = {}
    if tp_group is not None:
        from llmesh.services.executor.parallel import shard_slices
        slices = shard_slices(model)
    index = open_tensors(model_dir, config)
    state = {}
    for name in model.state_dict():
        if name == "lm_head.weight" and (config.tie_word_embeddings or name not in index):
            continue
        names = checkpoint_names(name)
        if name in slices:
            parts_spec, rows = slices[name]
            parts = [index.get_slice(n, s.dim, s.start, s.stop) for n, s in zip(names, parts_spec)]
        else:
            parts, rows = [index.get(n) for n in names], None
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if rows is not None and tensor.shape[0] < rows:  # the vocabulary's padded last shard
            pad = tensor.new_zeros((rows - tensor.shape[0],) + tuple(tensor.shape[1:]))
            tensor = torch.cat([tensor, pad])
        state[name] = tensor.to(device=device, dtype=torch_dtype)
    index.close()
    missing = model.load_state_dict(state, strict=False, assign=True).missing_keys
    if missing != ["lm_head.weight"] and missing:
        raise UnsupportedModelError(f"checkpoint lacks {missing}")
    if "lm_head.weight" in missing:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope(torch.device(device))
    model = model.eval().requires_grad_(False)
    if dtype in PACKED_FORMATS:
        pack_projections(model, dtype)
        return model
    from llmesh.services.executor import cpu_decode_step
    if cpu_decode_kernel and cpu_decode_step.why_not(config, device, torch_dtype,
                                                     tp_group is not None) is None:
        cpu_decode_step.pack_model(model)  # (before the reorder drops the plain weights)
    if torch_dtype == torch.bfloat16:
        prepack_bfloat16(model)
    return model
