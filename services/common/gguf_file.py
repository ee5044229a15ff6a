"""A GGUF file served as a model: its metadata rendered once as the files of a
Hugging Face directory, its weights read from the file itself.

`model_path(path)` is what every entry point calls on `--model`: a `.gguf` file
(or a directory holding one and no config.json) becomes a small directory in the
cache (config.json, tokenizer.json, tokenizer_config.json with the chat
template), keyed by the file's path, size and modification time; config.json
names the file (`gguf_file`), and the executor dequantizes its tensors from the
memory-mapped file at load (services/executor/gguf_weights.py). Anything else is
returned as it is. The file alone is enough: config, tokenizer and chat template
all come from its metadata.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from llmesh.services.common.errors import UnsupportedModelError
from llmesh.services.common.gguf_reader import GGUFFile

# general.architecture -> the Hugging Face architecture the engine implements
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
# tokenizer.ggml.pre -> the pre-tokenizer that splits text as the original tokenizer.json
# did (llama.cpp names each tokenizer family by the regex it uses)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                 r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?"
                r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("gpt2", "default"):
        return byte_level
    if pre == "smollm":  # GPT-2's split after single digits
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is None:
        raise UnsupportedModelError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported "
                                    "(gpt2, smollm, llama-bpe and qwen2 are)")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names: itself, or the one file in a directory that has
    no config.json (two or more is ambiguous: an error naming them)."""
    path = Path(path)
    if path.is_file():
        return path if is_gguf(path) else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise UnsupportedModelError(f"{path} holds {len(files)} GGUF files "
                                    f"({', '.join(f.name for f in files)}): name one")
    return files[0] if files else None


def cache_root() -> Path:
    """llmesh's cache: $LLMESH_CACHE_DIR, else ~/.cache/llmesh (read when called)."""
    base = os.environ.get("LLMESH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llmesh")
    return Path(base)


def model_path(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The model directory for `path`: a GGUF file's rendered directory (made once),
    or `path` itself."""
    gguf = find_gguf(path)
    if gguf is None:
        return Path(path)
    gguf = gguf.resolve()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = Path(cache_dir or cache_root() / "gguf") / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        render_directory(gguf, tmp)  # (an unsupported file raises here, leaving nothing)
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
            # (another process rendered it first: theirs is the same)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_arg(value: str) -> str:
    """argparse type of a service's --model: a model directory or a GGUF file."""
    return str(model_path(value))


class GGUFMetadata:
    """The key-value metadata of a GGUF file (its tensors are not read here)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        file = GGUFFile(path)
        self.values = file.metadata
        self.arch = self.get("general.architecture")
        self.tensor_names = set(file.tensors)

    def get(self, key: str, default=None):
        return self.values.get(key, default)

    def arch_get(self, key: str, default=None):
        return self.get(f"{self.arch}.{key}", default)


def hf_config(meta: GGUFMetadata) -> dict:
    """config.json for the model in the file (Hugging Face's names)."""
    if meta.arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"GGUF architecture {meta.arch!r} is not supported "
                                    f"(supported: {', '.join(ARCHITECTURES)})")
    if "rope_freqs.weight" in meta.tensor_names:
        raise UnsupportedModelError("GGUF with rope_freqs (Llama 3.1 RoPE scaling) is not "
                                    "supported; serve its Hugging Face directory")
    hidden = int(meta.arch_get("embedding_length"))
    num_heads = int(meta.arch_get("attention.head_count"))
    num_kv_heads = meta.arch_get("attention.head_count_kv", num_heads)
    tokens = meta.get("tokenizer.ggml.tokens") or []
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return {
        "architectures": [ARCHITECTURES[meta.arch]],
        "model_type": meta.arch,
        "vocab_size": int(meta.arch_get("vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(meta.arch_get("feed_forward_length")),
        "num_hidden_layers": int(meta.arch_get("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(num_kv_heads),
        "head_dim": int(meta.arch_get("attention.key_length", hidden // num_heads)),
        "rms_norm_eps": float(meta.arch_get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta.arch_get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.arch_get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in meta.tensor_names,
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "torch_dtype": "float32",
        "gguf_file": str(meta.path),
    }


def hf_tokenizer(meta: GGUFMetadata) -> tuple[Tokenizer, dict]:
    """The tokenizer in the file's metadata, and its tokenizer_config.json."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(f"GGUF tokenizer.ggml.model {kind!r} is not supported "
                                    "(byte-level BPE, 'gpt2', is); serve its Hugging Face directory")
    tokens = list(meta.get("tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                               ignore_merges=meta.get("tokenizer.ggml.pre") == "llama-bpe"))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    # control (3) and user-defined (4) tokens match whole, before the split
    tok.add_special_tokens([AddedToken(t, special=ty == 3, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (3, 4)])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, bos_id)])
    config = {"bos_token": bos, "eos_token": eos, "unk_token": token("unknown"),
              "pad_token": token("padding"), "add_bos_token": add_bos,
              "chat_template": meta.get("tokenizer.chat_template")}
    return tok, {k: v for k, v in config.items() if v is not None}


def render_directory(gguf: Path, out: Path) -> None:
    """Write config.json, tokenizer.json and tokenizer_config.json for `gguf` into `out`."""
    meta = GGUFMetadata(gguf)
    config = hf_config(meta)
    tok, tok_config = hf_tokenizer(meta)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}))
