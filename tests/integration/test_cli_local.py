"""`llmesh` as a user runs it: a real subprocess, bounded in time."""
import json
import os
import subprocess
import sys
from pathlib import Path

from services.common.sampling_params import SamplingParams
from services.engine.engine import Engine
from services.common.tokenizer import TextTokenizer

LLMESH = [sys.executable, "-m", "mesh.cli"]
ROOT = Path(__file__).resolve().parents[2]


def _run(args, cache_dir, timeout=120):
    env = {**os.environ, "LLMESH_CACHE_DIR": str(cache_dir)}
    return subprocess.run(LLMESH + args, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env)


def test_generate_local_json_matches_engine(tiny_model_dir, tmp_path):
    proc = _run(["generate", "--local", "--model", str(tiny_model_dir), "--prompt",
                 "The lighthouse keeper", "--max-tokens", "12", "--temperature", "0",
                 "--ignore-eos", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    tok = TextTokenizer(tiny_model_dir)
    expect = Engine.from_pretrained(tiny_model_dir).generate(
        [tok.encode("The lighthouse keeper")], SamplingParams(max_tokens=12, ignore_eos=True))[0][0]
    assert out["token_ids"] == expect.token_ids
    assert out["text"] == tok.decode(expect.token_ids)


def test_generate_streams_text_and_makes_default_model(tmp_path):
    proc = _run(["generate", "--local", "--prompt", "Hello", "--max-tokens", "8",
                 "--ignore-eos"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "models" / "tiny" / "model.safetensors").is_file()  # made on first use
    tok = TextTokenizer(tmp_path / "models" / "tiny")
    assert len(tok.encode(proc.stdout.strip(), add_special_tokens=False)) >= 4


def test_bad_input_is_a_clear_error(tiny_model_dir, tmp_path):
    proc = _run(["generate", "--local", "--model", str(tiny_model_dir), "--prompt", "x",
                 "--max-tokens", "100000"], tmp_path)
    assert proc.returncode == 2 and "max_tokens" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run(["generate", "--local", "--model", str(tmp_path), "--prompt", "x"], tmp_path)
    assert proc.returncode == 2 and "config.json" in proc.stderr


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    proc = _run(["generate", "--local", "--model", str(tmp_path), "--prompt", "x"], tmp_path)
    assert proc.returncode == 2 and "GPTNeoXForCausalLM" in proc.stderr


def test_make_tiny_cli(tmp_path):
    proc = _run(["model", "make-tiny", str(tmp_path / "m")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "tokenizer.json").is_file()
