"""The default model is deterministic and loadable; the tokenizer core streams valid text."""
import hashlib
import json

from hypothesis import given, settings, strategies as st

from llmesh.mesh.default_model import EOS, END, make_tiny
from llmesh.services.executor.model_config import load_model_config
from llmesh.services.common.tokenizer import IncrementalDetokenizer, TextTokenizer


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_make_tiny_is_byte_identical(tmp_path, tiny_model_dir):
    again = make_tiny(tmp_path / "again")
    assert _digest(again) == _digest(tiny_model_dir)
    assert set(_digest(again)) == {"config.json", "generation_config.json", "model.safetensors",
                                   "tokenizer.json", "tokenizer_config.json"}


def test_tiny_checkpoint_is_real_hf_format(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    config = load_model_config(tiny_model_dir)
    assert config.architecture == "LlamaForCausalLM" and 2000 <= config.vocab_size <= 4096
    hf_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ours = TextTokenizer(tiny_model_dir)
    text = "The lighthouse keeper woke before dawn, héllo 世界!"
    assert hf_tok(text)["input_ids"] == ours.encode(text)
    assert ours.encode(text)[0] == config.bos_token_id
    assert ours.decode(ours.encode(text)) == text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert hf_tok.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"] == \
        ours.apply_chat_template(msgs)
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [EOS, END]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.vocab_size == config.vocab_size


@settings(max_examples=60, deadline=None)
# U+FFFD itself is excluded (the check is that no chunk shows a half-decoded
# character as one), and so are special-token strings such as "<|end|>", which
# encode to special tokens that decoding leaves out
@given(text=st.text(min_size=0, max_size=60).filter(lambda t: "\ufffd" not in t and "<|" not in t),
       chunk=st.integers(1, 4))
def test_incremental_detokenizer_joins_to_full_decode(tiny_model_dir, text, chunk):
    tok = TextTokenizer(tiny_model_dir)
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    parts = [detok.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)] + [detok.flush()]
    assert "".join(parts) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in parts)
