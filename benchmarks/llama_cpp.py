"""llama.cpp's `llama-server` as a benchmark peer: built once, recorded always.

`build()` takes the newest `llama-cpp-python` source distribution from the
package index (`pip download --no-binary :all: --no-deps`; it vendors
llama.cpp as a git submodule, so the commit is known), configures it for this
CPU (`GGML_NATIVE`, Release, no TLS or curl: nothing is downloaded at run time)
and builds the `llama-server` target into a cache directory outside the repo
(`~/.cache/llmesh/llama.cpp/<version>`; about 10 minutes on 2 cores, once). The
record it returns (version, commit, cmake flags, binary) goes into every
results file that uses it. `convert()` turns a model directory into a GGUF with
llama.cpp's own converter and returns its path and SHA-256 (a model llmesh
serves from a GGUF file is first written out by `hf_checkpoint()` as the
float32 safetensors llmesh dequantizes it to, so both servers run the same
weights); `serve()` starts
the server on loopback and returns the process with its full command line.

    python -m llmesh.benchmarks.llama_cpp        # build (or find) and print the record
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

CACHE = Path(os.environ.get("LLMESH_CACHE", Path.home() / ".cache" / "llmesh")) / "llama.cpp"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_SERVER=ON",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF"]


def _log(msg: str) -> None:
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)


def _sdist(cache: Path) -> Path:
    """The newest sdist, downloaded into `cache/sdist` (kept: the build reads it once)."""
    found = sorted((cache / "sdist").glob("llama_cpp_python-*.tar.gz"))
    if found:
        return found[-1]
    (cache / "sdist").mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                    "llama-cpp-python", "-d", str(cache / "sdist")], check=True)
    return sorted((cache / "sdist").glob("llama_cpp_python-*.tar.gz"))[-1]


def build(cache: Path = CACHE, jobs: int | None = None) -> dict:
    """The record of a built llama-server (building it first when the cache lacks one)."""
    record_file = cache / "record.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if Path(record["server"]).is_file():
            return record
    sdist = _sdist(cache)
    version = sdist.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")
    src = cache / f"llama_cpp_python-{version}"
    if not src.is_dir():
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="fully_trusted")  # (the repo's .git files included)
    tree = src / "vendor" / "llama.cpp"
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    out = cache / "build"
    _log(f"building llama-server {commit[:12]} (llama-cpp-python {version}) into {out}")
    t0 = time.monotonic()
    subprocess.run(["cmake", "-S", str(tree), "-B", str(out), *CMAKE_FLAGS], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(out), "--target", "llama-server", "-j",
                    str(jobs or os.cpu_count() or 2)], check=True, stdout=subprocess.DEVNULL)
    record = {"llama_cpp_python": version, "llama_cpp_commit": commit,
              "cmake_flags": CMAKE_FLAGS, "server": str(out / "bin" / "llama-server"),
              "converter": str(tree / "convert_hf_to_gguf.py"), "gguf_py": str(tree / "gguf-py"),
              "build_s": round(time.monotonic() - t0, 1)}
    record_file.write_text(json.dumps(record, indent=2))
    return record


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# The converter names a BPE tokenizer's pre-tokenizer by a hash of how it splits a
# test text, and refuses hashes it does not list. The bench and tiny checkpoints'
# tokenizers split as GPT-2's does (byte-level BPE, GPT-2's pattern), under a hash
# of their own: this runs the converter with that one fallback, and the record says so.
_CONVERT = """
import runpy, sys
converter, fallback = sys.argv[1], sys.argv[2]
sys.path.insert(0, str(__import__("pathlib").Path(converter).parent))
from conversion import base
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        print(f"pre-tokenizer not in the converter's list: {fallback}", file=sys.stderr)
        return fallback
base.TextModel.get_vocab_base_pre = pre
sys.argv = [converter] + sys.argv[3:]
runpy.run_path(converter, run_name="__main__")
"""
PRE_TOKENIZER_FALLBACK = "gpt-2"


def hf_checkpoint(model_dir: str | Path, dest_root: Path = CACHE / "hf") -> Path:
    """A directory llama.cpp's converter reads for `model_dir`: itself, or, for a
    directory rendered from a GGUF file (SmolLM2's package ships only Q4_1), its
    weights as llmesh loads them (dequantized, Hugging Face names and layout) in
    float32 safetensors, with its config and tokenizer (written once)."""
    import torch
    from safetensors.torch import save_file
    from llmesh.services.executor.model import CausalLM
    from llmesh.services.executor.model_config import load_model_config
    from llmesh.services.executor.weights import checkpoint_names, open_tensors
    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    if not raw.get("gguf_file"):
        return model_dir
    out = dest_root / model_dir.name
    if (out / "model.safetensors").is_file():
        return out
    config = load_model_config(model_dir)
    with torch.device("meta"):
        names = [n for p in CausalLM(config).state_dict() for n in checkpoint_names(p)]
    index = open_tensors(model_dir, config)
    tensors = {n: index.get(n).float().contiguous() for n in names if n in index}
    index.close()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for f in model_dir.iterdir():
        if f.name != "config.json" and f.is_file():
            shutil.copy(f, tmp / f.name)
    raw.pop("gguf_file")
    (tmp / "config.json").write_text(json.dumps({**raw, "torch_dtype": "float32"}, indent=2))
    tmp.rename(out)
    _log(f"{model_dir} written as float32 safetensors: {out}")
    return out


def convert(record: dict, model_dir: str, outtype: str, dest_dir: Path = CACHE / "gguf") -> dict:
    """`model_dir` as a GGUF of `outtype` (f32, f16, bf16, q8_0) by llama.cpp's converter
    (an unknown BPE pre-tokenizer read as PRE_TOKENIZER_FALLBACK)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / f"{Path(model_dir).name}-{outtype}.gguf"
    args = [str(model_dir), "--outtype", outtype, "--outfile", str(out)]
    command = [sys.executable, "-c", _CONVERT, record["converter"], PRE_TOKENIZER_FALLBACK, *args]
    if not out.is_file():
        env = {**os.environ, "PYTHONPATH": record["gguf_py"]}
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return {"path": str(out), "sha256": sha256(out), "outtype": outtype,
            "command": f"{record['converter']} {' '.join(args)}",
            "pre_tokenizer_fallback": PRE_TOKENIZER_FALLBACK}


def serve(record: dict, gguf: str, port: int, parallel: int, threads: int, ctx: int,
          log_path: Path | None = None) -> tuple[subprocess.Popen, list[str]]:
    """llama-server on 127.0.0.1:`port` with `parallel` slots of `ctx // parallel` tokens
    each; returns once it answers /health (the process and its command line)."""
    command = [record["server"], "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
               "-np", str(parallel), "-t", str(threads), "-tb", str(threads), "-c", str(ctx),
               "--no-webui", "--cont-batching"]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}: {' '.join(command)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc, command
        except OSError:
            pass
        time.sleep(0.3)
    stop(proc)
    raise RuntimeError("llama-server did not answer /health in 120 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    record = build()
    if shutil.which(record["server"]) is None and not Path(record["server"]).is_file():
        raise SystemExit(f"no binary at {record['server']}")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
