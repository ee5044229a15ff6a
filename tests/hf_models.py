"""Tiny random Hugging Face checkpoints of each supported architecture, for parity tests."""
from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ["llama", "llama3-scaled", "mistral", "mistral-window", "qwen2", "qwen3", "llama-tied"]


def make_hf_model(arch: str, out_dir: Path, num_kv_heads: int = 2, seed: int = 0,
                  head_dim: int = 16, vocab_size: int = 320):
    """Build a random HF model of `arch`, save it to `out_dir`, return (model, dir)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=4 * head_dim, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=num_kv_heads,
                  head_dim=head_dim,
                  max_position_embeddings=1024, initializer_range=0.15, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=None, pad_token_id=0)  # no EOS: fixed lengths
    if arch == "llama":
        config, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif arch == "llama-tied":
        config, cls = tf.LlamaConfig(**common, tie_word_embeddings=True), tf.LlamaForCausalLM
    elif arch == "llama3-scaled":
        rope = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
        config, cls = tf.LlamaConfig(**common, rope_parameters=rope), tf.LlamaForCausalLM
    elif arch == "mistral":
        config, cls = tf.MistralConfig(**common, sliding_window=None), tf.MistralForCausalLM
    elif arch == "mistral-window":  # a window shorter than the test sequences
        config, cls = tf.MistralConfig(**common, sliding_window=16), tf.MistralForCausalLM
    elif arch == "qwen2":
        config, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        config, cls = tf.Qwen3Config(**common), tf.Qwen3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config).eval()
    if arch == "qwen2":  # random biases, so the bias path is really exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    if arch == "qwen3":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1, 0.2)
                layer.self_attn.k_norm.weight.normal_(1, 0.2)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    return model, out_dir
