"""A Hugging Face checkpoint written as a GGUF file the way llama.cpp's converter
lays one out (its tensor names, q/k rows permuted for interleaved RoPE, 1-D
tensors in F32, the tokenizer and chat template in the metadata), with the
gguf package's writer and quantizers."""
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from llmesh.services.executor.gguf_weights import gguf_name

QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


def permute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's order: within each head, rows i and i + half next to each other."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stored(w: np.ndarray, qtype: str) -> tuple[np.ndarray, object]:
    """What the file holds for `w` in `qtype` (1-D tensors stay F32), and its type."""
    from gguf import GGMLQuantizationType, quantize
    t = GGMLQuantizationType[qtype if w.ndim > 1 else "F32"]
    if t == GGMLQuantizationType.F32:
        return w.astype(np.float32), t
    if t == GGMLQuantizationType.F16:
        return w.astype(np.float16), t
    return quantize(w.astype(np.float32), t), t


def as_loaded(w: np.ndarray, qtype: str) -> np.ndarray:
    """`w` as it comes back from a `qtype` file: the quant's own rounding, no more."""
    from gguf import dequantize
    data, t = stored(w, qtype)
    return np.asarray(dequantize(data, t), dtype=np.float32).reshape(w.shape)


def write_gguf(model_dir: Path, out: Path, qtype: str = "F32") -> Path:
    import gguf
    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    w = gguf.GGUFWriter(str(out), "llama")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_vocab_size(config["vocab_size"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"]: t for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if added.get(i, {}).get("special") else 1 for _, i in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    w.add_add_bos_token(bool(tok_config.get("add_bos_token")))
    w.add_chat_template(tok_config["chat_template"])
    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        key = gguf_name(name)
        if ".attn_q." in key or ".attn_k." in key:
            tensor = permute_rope_rows(tensor, heads if ".attn_q." in key else kv_heads)
        data, t = stored(tensor, qtype)
        w.add_tensor(key, data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
