"""Sampling parameters of one request, and their validation.

Validation happens once, where a request enters (router or Engine.add_request):
every error names the offending field and nothing has been allocated yet.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from llmesh.services.common.errors import InvalidRequestError
from llmesh.services.common.grammar_spec import GrammarSpec

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 64
MAX_REPETITION_NGRAM = 16
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class Range:
    """The values a numeric sampling parameter accepts, on every edge alike."""

    lo: float
    hi: float
    is_int: bool = False
    lo_open: bool = False  # lo itself is refused

    def check(self, name: str, value: object) -> None:
        """Raise InvalidRequestError naming `name` unless `value` is in range."""
        if self.is_int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequestError(name, f"must be an integer, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequestError(name, f"must be a number, got {value!r}")
        elif value != value:  # NaN
            raise InvalidRequestError(name, "must not be NaN")
        if (value <= self.lo if self.lo_open else value < self.lo) or value > self.hi:
            raise InvalidRequestError(name, f"must be in {self.describe()}, got {value}")

    def describe(self) -> str:
        lo, hi = (self.lo, self.hi) if self.is_int else (f"{self.lo:g}", f"{self.hi:g}")
        return f"{'(' if self.lo_open else '['}{lo}, {hi}]"


def param(default, range_: Range | None = None, *, http: str | None = "",
          sampler: bool = False):
    """A declared sampling parameter: a SamplingParams field whose name is also its
    field in the protos (common.SamplingParams, engine.SamplingConfig) and, with
    `http` "" (the default), its key in OpenAI bodies (None: HTTP has its own
    fields for it). `range_`: the values every edge accepts. `sampler`: the
    executor's sampler reads it (the others act in the scheduler)."""
    return dataclasses.field(default=default, metadata={
        "range": range_, "http": http, "sampler": sampler})


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request: the one declaration of every sampling
    parameter (name, type, default, range, HTTP key, who reads it). Conversion
    (services/common/convert.py), validation (`validate`) and the HTTP API's
    parsing (services/router/http_api/requests.py) derive from it; adding a
    parameter is docs/sampling-parameters.md's recipe. Defaults: greedy, 16 tokens."""

    max_tokens: int = param(16, Range(1, 2**31 - 1, is_int=True))
    temperature: float = param(0.0, Range(0.0, 2.0), sampler=True)  # 0 = greedy
    top_p: float = param(1.0, Range(0.0, 1.0, lo_open=True), sampler=True)
    top_k: int = param(0, Range(0, 2**31 - 1, is_int=True), sampler=True)  # 0 = off
    min_p: float = param(0.0, Range(0.0, 1.0), sampler=True)
    repetition_penalty: float = param(1.0, Range(0.0, 100.0, lo_open=True), sampler=True)
    presence_penalty: float = param(0.0, Range(-2.0, 2.0), sampler=True)
    frequency_penalty: float = param(0.0, Range(-2.0, 2.0), sampler=True)
    # None until drawn (`with_seed`); sampling is keyed by (seed, choice, position)
    seed: int | None = param(None, Range(0, 2**63 - 1, is_int=True), sampler=True)
    stop_token_ids: tuple[int, ...] = param(())
    stop: tuple[str, ...] = param(())  # stop strings, matched on the generated text (not included)
    ignore_eos: bool = param(False)
    # None = off; k = chosen token plus k alternatives
    logprobs: int | None = param(None, Range(0, MAX_TOP_LOGPROBS, is_int=True), sampler=True)
    n: int = param(1, Range(1, MAX_N, is_int=True))
    # opt-in early stop: the output ends with an n-gram (n <= repetition_max_ngram)
    # repeated repetition_min_repeats times in a row; 0 = off
    repetition_max_ngram: int = param(0, Range(0, MAX_REPETITION_NGRAM, is_int=True))
    repetition_min_repeats: int = param(0, Range(0, 16, is_int=True))
    # structured output: the output must match it (protos: `structured` / grammar_kind
    # and grammar_source; HTTP: response_format and vLLM's guided_* fields)
    grammar: GrammarSpec | None = param(None, http=None)
    # speculative decoding (prompt lookup): up to this many draft tokens a step; 0 =
    # off; None = the replica's default (engine.speculative_tokens). The output is
    # the same either way: only how fast it comes changes
    speculative_tokens: int | None = param(None, Range(0, MAX_SPECULATIVE_TOKENS, is_int=True))

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        """What `dataclasses.asdict` made of one (a dead letter's JSON)."""
        grammar = d.get("grammar")
        return cls(**{name: tuple(d[name]) if isinstance(d[name], list) else d[name]
                      for name in PARAMS if name != "grammar" and name in d},
                   grammar=GrammarSpec(**grammar) if grammar else None)

    def with_seed(self) -> "SamplingParams":
        """These parameters with a seed: the user's, or one drawn now. The one place
        a seed is drawn: the router calls it (so a request keeps its seed wherever it
        moves), and a replica for a request that comes without one (the offline
        Engine). Seeded sampling is keyed by (seed, choice, position)."""
        if self.seed is not None:
            return self
        return dataclasses.replace(self, seed=_SEEDS.getrandbits(63))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidRequestError naming the first bad field."""
        for name, bounds in RANGES.items():
            value = getattr(self, name)
            if value is not None:  # (seed and logprobs are optional)
                bounds.check(name, value)
        if self.repetition_max_ngram and self.repetition_min_repeats < 2:
            raise InvalidRequestError("repetition_min_repeats",
                                      "must be at least 2 when repetition_max_ngram is set")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids")
        for token_id in self.stop_token_ids:
            check_token_id("stop_token_ids", token_id, vocab_size)
        if self.grammar is not None:
            if self.ignore_eos:
                raise InvalidRequestError("ignore_eos", "cannot be combined with structured "
                                          "output (a finished grammar allows only EOS)")
            self.grammar.validate()
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        for text in self.stop:
            if not isinstance(text, str) or not text or len(text) > MAX_STOP_STRING_CHARS:
                raise InvalidRequestError(
                    "stop", f"stop strings must be 1 to {MAX_STOP_STRING_CHARS} characters")


PARAMS = {f.name: f for f in dataclasses.fields(SamplingParams)}
# each numeric parameter's range: what the Engine and gRPC check (`validate`) and
# the HTTP API when it parses a body, so both accept the same values
RANGES = {name: f.metadata["range"] for name, f in PARAMS.items() if f.metadata["range"]}
SAMPLER_PARAMS = tuple(name for name, f in PARAMS.items() if f.metadata["sampler"])
_SEEDS = random.Random()


def check_token_id(field_name: str, token_id: object, vocab_size: int) -> None:
    if isinstance(token_id, bool) or not isinstance(token_id, int):
        raise InvalidRequestError(field_name, f"token id {token_id!r} is not an integer")
    if not 0 <= token_id < vocab_size:
        raise InvalidRequestError(
            field_name, f"token id {token_id} is outside the vocabulary [0, {vocab_size})"
        )


def check_token_ids(field_name: str, token_ids, vocab_size: int) -> None:
    """`check_token_id` on each (a prompt of thousands: plain ints in range pass in
    one pass over them, the rest one by one, for the error of the first bad one)."""
    if token_ids and all(type(t) is int for t in token_ids) \
            and 0 <= min(token_ids) and max(token_ids) < vocab_size:
        return
    for token_id in token_ids:
        check_token_id(field_name, token_id, vocab_size)


def validate_request(prompt_token_ids: object, params: SamplingParams, vocab_size: int,
                     max_model_len: int, max_kv_tokens: int) -> None:
    """Everything about a request that can be checked before it is queued."""
    if not isinstance(prompt_token_ids, (list, tuple)) or not prompt_token_ids:
        raise InvalidRequestError("prompt_token_ids", "must be a non-empty list of token ids")
    check_token_ids("prompt_token_ids", prompt_token_ids, vocab_size)
    params.validate(vocab_size)
    num_prompt = len(prompt_token_ids)
    if num_prompt >= max_model_len:
        raise InvalidRequestError(
            "prompt_token_ids", f"prompt has {num_prompt} tokens; the context is {max_model_len} "
            "and at least one must be left to generate")
    if num_prompt + params.max_tokens > max_model_len:
        raise InvalidRequestError(
            "max_tokens", f"prompt ({num_prompt}) + max_tokens ({params.max_tokens}) exceeds the "
            f"context of {max_model_len} tokens")
    if num_prompt + params.max_tokens > max_kv_tokens:
        raise InvalidRequestError(
            "max_tokens", f"prompt + max_tokens needs more KV cache than the replica has "
            f"({max_kv_tokens} token slots)")


def validate_resume(resume: list[int], params: SamplingParams, vocab_size: int) -> None:
    """The output tokens a client already has of a stream it is resuming."""
    if params.n != 1:
        raise InvalidRequestError("resume_token_ids", "only an n = 1 request can resume")
    if len(resume) >= params.max_tokens:
        raise InvalidRequestError("resume_token_ids", f"{len(resume)} tokens already received; "
                                  f"max_tokens ({params.max_tokens}) leaves none to generate")
    check_token_ids("resume_token_ids", resume, vocab_size)


def ends_in_repetition(tokens: list[int], max_ngram: int, min_repeats: int) -> bool:
    """True when `tokens` ends with some n-gram (1 <= n <= max_ngram) repeated
    `min_repeats` times in a row."""
    if not max_ngram or min_repeats < 2:
        return False
    for n in range(1, max_ngram + 1):
        span = n * min_repeats
        if span > len(tokens):
            break
        tail = tokens[-span:]
        if all(tail[i] == tail[i % n] for i in range(n, span)):
            return True
    return False
