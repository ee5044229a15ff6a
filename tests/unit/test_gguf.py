"""GGUF files: the tiny model written as GGUF (as llama.cpp's converter lays one
out) in each supported type loads with the quant's own rounding and nothing else,
its tokenizer and chat template come from the metadata and encode exactly as
tokenizer.json does, and what is not supported is an error that names it."""
import json
import random

import numpy as np
import pytest
import torch

from gguf_files import QTYPES, as_loaded, write_gguf
from llmesh.services.common.errors import UnsupportedModelError
from llmesh.services.common.gguf_file import find_gguf, model_path
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.common.tokenizer import TextTokenizer
from llmesh.services.engine.engine import Engine, EngineConfig
from llmesh.services.executor.model_config import load_model_config
from llmesh.services.executor.weights import load_model

TEXTS = ["The lighthouse keeper climbed the stairs.", "  two  spaces\nand\n\nlines\ttab",
         "numbers 12345 and 3.14159", "<|start|>user\nhi<|end|>\n", "naïve café 日本 🎉",
         "don't won't they'll", ""]


@pytest.fixture(scope="module")
def gguf_files(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {q: write_gguf(tiny_model_dir, d / f"tiny-{q}.gguf", q) for q in QTYPES}


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.mark.parametrize("qtype", QTYPES)
def test_weights_load_with_the_quants_own_rounding(tiny_model_dir, gguf_files, cache, qtype):
    from safetensors.numpy import load_file
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    model = load_model(model_path(gguf_files[qtype], cache))
    state = model.state_dict()
    checked = 0
    for name, w in original.items():
        if ".q_proj." in name or ".k_proj." in name or ".v_proj." in name:
            fused = name.replace(".q_proj.", ".qkv_proj.").replace(
                ".k_proj.", ".qkv_proj.").replace(".v_proj.", ".qkv_proj.")
            q = original[fused.replace(".qkv_proj.", ".q_proj.")].shape[0]
            k = original[fused.replace(".qkv_proj.", ".k_proj.")].shape[0]
            start = {"q": 0, "k": q, "v": q + k}[name.split(".")[-2][0]]
            got = state[fused][start:start + w.shape[0]]
        elif ".gate_proj." in name or ".up_proj." in name:
            fused = name.replace(".gate_proj.", ".gate_up_proj.").replace(".up_proj.", ".gate_up_proj.")
            inter = w.shape[0]
            got = state[fused][:inter] if ".gate_proj." in name else state[fused][inter:]
        else:
            got = state[name]
        expect = torch.from_numpy(as_loaded(w, qtype))
        assert torch.equal(got, expect), name
        checked += 1
    assert checked == len(original)


def test_config_comes_from_the_metadata(tiny_model_dir, gguf_files, cache):
    ours, theirs = load_model_config(model_path(gguf_files["F32"], cache)), \
        load_model_config(tiny_model_dir)
    for field in ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                  "num_heads", "num_kv_heads", "head_dim", "rms_norm_eps", "rope_theta",
                  "max_position_embeddings", "bos_token_id"):
        assert getattr(ours, field) == pytest.approx(getattr(theirs, field)), field


def test_float32_gguf_generates_as_the_safetensors_model(tiny_model_dir, gguf_files, cache):
    rng = random.Random(3)
    prompts = [[0] + rng.choices(range(5, 3000), k=rng.randint(3, 40)) for _ in range(6)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    expect = Engine.from_pretrained(tiny_model_dir, EngineConfig(num_kv_blocks=64)).generate(
        prompts, params)
    got = Engine.from_pretrained(model_path(gguf_files["F32"], cache),
                                 EngineConfig(num_kv_blocks=64)).generate(prompts, params)
    assert [c[0].token_ids for c in got] == [c[0].token_ids for c in expect]


def test_tokenizer_and_chat_template_come_from_the_metadata(tiny_model_dir, gguf_files, cache):
    ours, theirs = TextTokenizer(model_path(gguf_files["Q4_0"], cache)), \
        TextTokenizer(tiny_model_dir)
    rng = random.Random(7)
    words = open(tiny_model_dir / "tokenizer.json").read()[:5000].split()
    texts = TEXTS + [" ".join(rng.choices(words, k=60)) for _ in range(20)]
    for text in texts:
        for special in (True, False):
            assert ours.encode(text, special) == theirs.encode(text, special), text
    ids = theirs.encode(TEXTS[0])
    assert ours.decode(ids) == theirs.decode(ids)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert ours.apply_chat_template(chat) == theirs.apply_chat_template(chat)


def test_the_rendered_directory_is_made_once(gguf_files, cache, tmp_path):
    first = model_path(gguf_files["F16"], cache)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert model_path(gguf_files["F16"], cache) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    assert json.loads((first / "config.json").read_text())["gguf_file"] == \
        str(gguf_files["F16"].resolve())
    # a directory holding one GGUF file (and no config.json) is that file
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "m.gguf").write_bytes(gguf_files["F16"].read_bytes())
    rendered = model_path(alone, cache)
    assert rendered != first and json.loads((rendered / "config.json").read_text())[
        "gguf_file"] == str((alone / "m.gguf").resolve())
    # a Hugging Face directory is itself
    assert model_path(first, cache) == first


def _small_gguf(path, arch: str, **keys):
    """A GGUF file with one tensor and the metadata `keys` (writer method -> value)."""
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    for method, value in keys.items():
        getattr(w, f"add_{method}")(value)
    w.add_tensor("token_embd.weight", np.zeros((2, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_what_is_not_supported_is_named(gguf_files, tmp_path, cache):
    with pytest.raises(UnsupportedModelError, match="6 GGUF files"):
        find_gguf(gguf_files["F32"].parent)  # which one?
    with pytest.raises(UnsupportedModelError, match="architecture 'phi2'"):
        model_path(_small_gguf(tmp_path / "phi.gguf", "phi2"), cache)
    assert not list(cache.iterdir())  # nothing half-rendered is left behind
    spm = _small_gguf(tmp_path / "spm.gguf", "llama", embedding_length=32,
                      feed_forward_length=64, head_count=2, tokenizer_model="llama",
                      token_list=["<unk>", "a"])
    with pytest.raises(UnsupportedModelError, match="tokenizer.ggml.model 'llama'"):
        model_path(spm, cache)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"not a model")
    assert find_gguf(not_gguf) is None
