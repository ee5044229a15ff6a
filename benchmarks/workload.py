"""Seeded, reproducible workloads: token-id prompts with fixed output lengths (ignore_eos).

Built in: `chat` (long-tailed prompt and output lengths), `shared-prefix` (one
long system prompt shared by every request), `long-context` (prompts near the
context limit), `bursty` (chat lengths, and a 10x spike in arrival rate for a
window of the run; the spike is applied by rate-based arrivals). Also: any
JSONL file this module writes (`write_jsonl`) and any ShareGPT-format JSON file.

A workload is an endless stream: `stream(part)` gives the same requests every
time for the same part, so every target of a run sees the same requests, and
each point of a rate sweep (part 0, 1, ...) gets its own prompts (a prompt seen
in an earlier point would be a prefix-cache hit).
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

BUILTIN = ("chat", "shared-prefix", "long-context", "bursty")
FIRST_RANDOM_TOKEN = 8  # ids below this are the tiny model's special tokens
BURST = {"start_frac": 0.4, "end_frac": 0.6, "factor": 10.0}


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int
    priority: str = ""  # scheduling class (interactive / standard / batch); "" = the default


@dataclass
class Workload:
    name: str
    meta: dict  # name, seed, parameters; "burst" when arrivals should spike
    _stream: Callable[[int], Iterator[BenchRequest]] = field(repr=False)

    def stream(self, part: int = 0) -> Iterator[BenchRequest]:
        return self._stream(part)

    def take(self, n: int, part: int = 0) -> list[BenchRequest]:
        return list(itertools.islice(self.stream(part), n))

    @property
    def burst(self) -> dict | None:
        return self.meta.get("burst")


def long_tailed(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(rng.lognormvariate(0.0, sigma) * median))))


def _rng(seed: int, part: int) -> random.Random:
    # part 0 keeps the plain integer seed: `chat` part 0 is the historical offline workload
    return random.Random(seed if part == 0 else f"{seed}/{part}")


def _random_tokens(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(FIRST_RANDOM_TOKEN, vocab_size) for _ in range(n)]


def _fit(num_prompt: int, num_output: int, max_model_len: int) -> tuple[int, int]:
    """Shorten the output (then the prompt) so that prompt + output fits the context."""
    num_prompt = min(num_prompt, max_model_len - 1)
    return num_prompt, max(1, min(num_output, max_model_len - num_prompt))


def chat(vocab_size: int, max_model_len: int, seed: int = 0, max_prompt: int = 1024,
         max_output: int = 512, bos_token_id: int = 0, burst: dict | None = None) -> Workload:
    """Prompts 16..max_prompt tokens (median 128), outputs 8..max_output (median 64)."""
    def stream(part: int) -> Iterator[BenchRequest]:
        rng = _rng(seed, part)
        while True:
            num_prompt = long_tailed(rng, 128, 0.9, 16, max_prompt)
            num_output = long_tailed(rng, 64, 1.0, 8, max_output)
            prompt = [bos_token_id] + _random_tokens(rng, num_prompt - 1, vocab_size)
            num_prompt, num_output = _fit(num_prompt, num_output, max_model_len)
            yield BenchRequest(prompt[:num_prompt], num_output)

    meta = {"name": "bursty" if burst else "chat", "seed": seed, "max_prompt": max_prompt,
            "max_output": max_output}
    if burst:
        meta["burst"] = dict(burst)
    return Workload(meta["name"], meta, stream)


def shared_prefix(vocab_size: int, max_model_len: int, seed: int = 0, prefix_len: int = 512,
                  max_output: int = 512, bos_token_id: int = 0) -> Workload:
    """One system prompt of `prefix_len` tokens, then a short user turn (median 32 tokens)."""
    prefix_len = max(2, min(prefix_len, max_model_len // 2))

    def stream(part: int) -> Iterator[BenchRequest]:
        rng = _rng(seed, part)
        system = [bos_token_id] + _random_tokens(rng, prefix_len - 1, vocab_size)
        while True:
            num_user = long_tailed(rng, 32, 0.6, 4, 256)
            num_output = long_tailed(rng, 64, 0.8, 8, max_output)
            prompt = system + _random_tokens(rng, num_user, vocab_size)
            num_prompt, num_output = _fit(len(prompt), num_output, max_model_len)
            yield BenchRequest(prompt[:num_prompt], num_output)

    return Workload("shared-prefix", {"name": "shared-prefix", "seed": seed,
                                      "prefix_len": prefix_len, "max_output": max_output}, stream)


def long_context(vocab_size: int, max_model_len: int, seed: int = 0, max_output: int = 128,
                 bos_token_id: int = 0) -> Workload:
    """Prompts filling 80..95% of what the context leaves after the output."""
    def stream(part: int) -> Iterator[BenchRequest]:
        rng = _rng(seed, part)
        while True:
            num_output = long_tailed(rng, 32, 0.5, 8, min(max_output, max_model_len // 8))
            room = max_model_len - num_output
            num_prompt = max(2, rng.randint(int(0.80 * room), int(0.95 * room)))
            prompt = [bos_token_id] + _random_tokens(rng, num_prompt - 1, vocab_size)
            yield BenchRequest(prompt, num_output)

    return Workload("long-context", {"name": "long-context", "seed": seed,
                                     "max_model_len": max_model_len, "max_output": max_output},
                    stream)


def builtin(name: str, vocab_size: int, max_model_len: int, seed: int = 0,
            max_prompt: int = 1024, max_output: int = 512, bos_token_id: int = 0) -> Workload:
    if name == "chat":
        return chat(vocab_size, max_model_len, seed, max_prompt, max_output, bos_token_id)
    if name == "bursty":
        return chat(vocab_size, max_model_len, seed, max_prompt, max_output, bos_token_id, BURST)
    if name == "shared-prefix":
        return shared_prefix(vocab_size, max_model_len, seed, min(512, max_prompt), max_output,
                             bos_token_id)
    if name == "long-context":
        return long_context(vocab_size, max_model_len, seed, min(128, max_output), bos_token_id)
    raise ValueError(f"unknown workload {name!r}: one of {', '.join(BUILTIN)}, "
                     "a .jsonl file or a ShareGPT .json file")


def offline_workload(num_requests: int, vocab_size: int, seed: int = 0, max_prompt: int = 1024,
                     max_output: int = 512, bos_token_id: int = 0) -> list[BenchRequest]:
    """The `chat` workload's first `num_requests` requests (the historical offline workload)."""
    return chat(vocab_size, 1 << 30, seed, max_prompt, max_output, bos_token_id).take(num_requests)


# ---- files ------------------------------------------------------------
def _cycling(reqs: list[BenchRequest], seed: int, shuffle: bool) -> Callable:
    if not reqs:
        raise ValueError("the workload file holds no usable request")

    def stream(part: int) -> Iterator[BenchRequest]:
        order = list(range(len(reqs)))
        if shuffle or part:
            _rng(seed, part).shuffle(order)
        return (reqs[i] for i in itertools.cycle(order))

    return stream


def write_jsonl(path: str | Path, workload: Workload, num_requests: int, part: int = 0) -> Path:
    """A header line (`{"llmesh_workload": ...}`) then one request per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.write(json.dumps({"llmesh_workload": {**workload.meta, "part": part}}) + "\n")
        for r in workload.take(num_requests, part):
            f.write(json.dumps({"prompt_token_ids": r.prompt_token_ids,
                                "max_tokens": r.max_tokens}) + "\n")
    return path


def read_jsonl(path: str | Path, encode: Callable[[str], list[int]] | None = None,
               seed: int = 0) -> Workload:
    """Lines of {"prompt_token_ids": [...] | "prompt": "text", "max_tokens": N}; an optional
    header line carries the workload's name, seed and burst window."""
    meta: dict = {}
    reqs = []
    for num, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        if "llmesh_workload" in obj:
            meta = dict(obj["llmesh_workload"])
            continue
        if "prompt_token_ids" in obj:
            ids = [int(t) for t in obj["prompt_token_ids"]]
        elif "prompt" in obj and encode is not None:
            ids = encode(obj["prompt"])
        else:
            raise ValueError(f"{path}:{num}: needs prompt_token_ids (or prompt with a tokenizer)")
        reqs.append(BenchRequest(ids, int(obj.get("max_tokens", 16))))
    name = f"file:{Path(path).name}"
    meta = {**meta, "source_name": meta.get("name"), "name": name, "file": str(path),
            "num_distinct_requests": len(reqs)}
    return Workload(name, meta, _cycling(reqs, seed, shuffle=False))


def read_sharegpt(path: str | Path, encode: Callable[[str], list[int]], max_model_len: int,
                  seed: int = 0, max_output: int = 512,
                  count: Callable[[str], int] | None = None) -> Workload:
    """ShareGPT JSON: a list of {"conversations": [{"from": "human", "value": ...},
    {"from": "gpt", "value": ...}, ...]}. Each conversation's first human turn is the
    prompt; the reply that follows it sets the output length (in tokens)."""
    data = json.loads(Path(path).read_text())
    count = count or (lambda text: len(encode(text)))
    reqs = []
    for item in data:
        turns = item.get("conversations") or item.get("conversation") or []
        for a, b in zip(turns, turns[1:]):
            if a.get("from") in ("human", "user") and b.get("from") in ("gpt", "assistant"):
                prompt = encode(a.get("value", ""))
                num_output = min(max_output, count(b.get("value", "")))
                if len(prompt) >= 4 and num_output >= 1 and len(prompt) + num_output <= max_model_len:
                    reqs.append(BenchRequest(prompt, num_output))
                break
    meta = {"name": f"sharegpt:{Path(path).name}", "file": str(path), "seed": seed,
            "num_distinct_requests": len(reqs), "max_output": max_output}
    return Workload(meta["name"], meta, _cycling(reqs, seed, shuffle=True))


def load(spec: str, vocab_size: int, max_model_len: int, seed: int = 0, max_prompt: int = 1024,
         max_output: int = 512, bos_token_id: int = 0, model_dir=None) -> Workload:
    """A built-in name, a .jsonl file or a ShareGPT .json file."""
    if spec in BUILTIN:
        return builtin(spec, vocab_size, max_model_len, seed, max_prompt, max_output, bos_token_id)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"unknown workload {spec!r}: one of {', '.join(BUILTIN)}, "
                         "a .jsonl file or a ShareGPT .json file")
    tok = None
    if model_dir is not None:
        from llmesh.services.common.tokenizer import TextTokenizer
        tok = TextTokenizer(model_dir)
    if path.suffix == ".jsonl":
        return read_jsonl(path, tok.encode if tok else None, seed)
    if tok is None:
        raise ValueError("a ShareGPT file needs the model's tokenizer")
    return read_sharegpt(path, tok.encode, max_model_len, seed, max_output,
                         lambda text: len(tok.encode(text, add_special_tokens=False)))
