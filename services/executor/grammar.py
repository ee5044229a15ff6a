"""Structured output: grammar-constrained decoding (JSON schema, regex, EBNF) over xgrammar.

`GrammarSpec` is the request's constraint; `validate()` parses it without a
tokenizer (well under a millisecond) so the request's edge can reject a bad
schema before anything is queued. On the executor, `GrammarCompiler` turns a
spec into a token-level `xgr.CompiledGrammar` for the model's vocabulary
(cached by spec), `SequenceGrammar` is one sequence's matcher state, and
`apply_masks` masks a batch of logits rows in place before sampling.

Stop tokens: the compiler's `stop_token_ids` must be the ids the scheduler
finishes a sequence on. Once the grammar is complete its mask allows only those;
after one is accepted the matcher is terminated and the mask stays stop-only.
"""
from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch
import xgrammar as xgr
from tokenizers import Tokenizer

from llmesh.services.common.errors import InvalidRequestError, UnsupportedModelError
from llmesh.services.common.grammar_spec import GrammarSpec, clean_error

def load_tokenizer_info(model_dir: str | Path, vocab_size: int,
                        stop_token_ids: Sequence[int]) -> xgr.TokenizerInfo:
    """xgrammar's view of the model's `tokenizer.json`, `vocab_size` wide (the model's
    lm_head rows, which may exceed the tokenizer's vocabulary: padding ids never match).

    Special added tokens get an empty text so the grammar never allows them:
    xgrammar would otherwise treat e.g. `<|pad|>` as the seven characters it spells,
    valid inside any JSON string. Stop tokens stay allowed where the grammar may end.
    """
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedModelError(f"{model_dir}: no tokenizer.json")
    text = path.read_text()
    tokenizer = Tokenizer.from_str(text)
    encoded_vocab = [""] * vocab_size
    for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        if token_id < vocab_size:
            encoded_vocab[token_id] = token
    for token_id, added in tokenizer.get_added_tokens_decoder().items():
        if added.special and token_id < vocab_size:
            encoded_vocab[token_id] = ""
    # the same detection from_huggingface runs on the serialized tokenizer (no transformers load)
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(text)
    return xgr.TokenizerInfo(encoded_vocab, meta["vocab_type"], vocab_size=vocab_size,
                             stop_token_ids=list(stop_token_ids),
                             add_prefix_space=meta["add_prefix_space"])


class GrammarCompiler:
    """Compiles specs for one model's vocabulary; keeps the last `max_cached` compiled
    grammars (a compiled grammar is immutable and shared by every sequence using it)."""

    def __init__(self, tokenizer: str | Path | xgr.TokenizerInfo, vocab_size: int,
                 stop_token_ids: Sequence[int], *, max_cached: int = 128,
                 any_whitespace: bool = False, max_threads: int = 8):
        if not stop_token_ids:
            raise ValueError("stop_token_ids: a grammar needs at least one stop token")
        if isinstance(tokenizer, xgr.TokenizerInfo):
            assert tokenizer.vocab_size == vocab_size, (tokenizer.vocab_size, vocab_size)
            self.tokenizer_info = tokenizer
        else:
            self.tokenizer_info = load_tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
        self.any_whitespace = any_whitespace
        self.max_cached = max_cached
        # xgrammar 0.2.8 lets length-bounded JSON strings ({"maxLength": n}) take raw control
        # characters, which no JSON parser accepts: JSON outputs never get those tokens
        banned = bytes(b for b in range(0x20) if not (any_whitespace and b in b"\t\n\r"))
        self._json_row = _pack_bits(torch.tensor([
            len(text.translate(None, banned)) == len(text)
            for text in self.tokenizer_info.decoded_vocab]))
        # our own LRU keyed by spec: xgrammar's cache is keyed by its own arguments
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads,
                                             cache_enabled=False)
        self._cache: OrderedDict[GrammarSpec, xgr.CompiledGrammar] = OrderedDict()
        self._pending: dict[GrammarSpec, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """The compiled grammar (cached); raises InvalidRequestError for a bad spec."""
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
                return compiled
        grammar = spec.validate(any_whitespace=self.any_whitespace)
        try:
            compiled = self._compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError) as e:
            raise InvalidRequestError(spec.field, f"invalid {spec.kind}: {clean_error(e)}") from None
        with self._lock:
            self._cache[spec] = compiled
            self._cache.move_to_end(spec)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return compiled

    def compile_async(self, spec: GrammarSpec) -> Future:
        """`compile` on a worker thread (xgrammar releases the GIL), so a large-vocabulary
        compile (hundreds of ms) overlaps the sequence's prefill instead of stalling a
        step. One future per spec in flight; a cached spec's future is already done."""
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
                done: Future = Future()
                done.set_result(compiled)
                return done
            future = self._pending.get(spec)
            if future is not None:
                return future
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")
            future = self._pending[spec] = self._pool.submit(self.compile, spec)
        future.add_done_callback(lambda _: self._forget_pending(spec))
        return future

    def _forget_pending(self, spec: GrammarSpec) -> None:
        with self._lock:
            self._pending.pop(spec, None)

    def close(self) -> None:
        """Stop the compile workers (compiles in flight finish first)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def sequence(self, spec: GrammarSpec, output_ids: Sequence[int] = ()) -> SequenceGrammar:
        """A new sequence's grammar state, after replaying `output_ids` (a sequence
        recomputed after preemption). ValueError if the grammar rejects one of them."""
        grammar = SequenceGrammar(self.compile(spec), self.stop_token_ids,
                                  allowed_row=self._json_row if spec.kind.startswith("json") else None)
        if not grammar.replay(output_ids):
            raise ValueError(f"output_ids: the {spec.kind} grammar rejects them")
        return grammar

    @property
    def num_cached(self) -> int:
        return len(self._cache)


class SequenceGrammar:
    """One sequence's position in its grammar (an xgrammar GrammarMatcher)."""

    def __init__(self, compiled: xgr.CompiledGrammar, stop_token_ids: Sequence[int],
                 matcher: xgr.GrammarMatcher | None = None,
                 allowed_row: torch.Tensor | None = None):
        """`allowed_row`: a packed int32 `[ceil(vocab / 32)]` mask ANDed into every mask."""
        self.compiled = compiled
        self.stop_token_ids = tuple(stop_token_ids)
        self.vocab_size = compiled.tokenizer_info.vocab_size
        self.matcher = matcher or xgr.GrammarMatcher(compiled)
        self.allowed_row = allowed_row
        self._stop_row = _stop_row(self.stop_token_ids, self.vocab_size)

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False (state unchanged) if the grammar rejects it.
        After termination only stop tokens are accepted (and change nothing)."""
        if self.matcher.is_terminated():
            return token_id in self.stop_token_ids
        return self.matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        """A stop token was accepted after the grammar was complete."""
        return self.matcher.is_terminated()

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this sequence's allowed next tokens into `bitmask[row]` (CPU int32
        `[rows, ceil(vocab / 32)]`); stop tokens only once terminated."""
        if self.matcher.is_terminated():  # xgrammar refuses to fill a mask after its stop token
            bitmask[row].copy_(self._stop_row)
            return
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.allowed_row is not None:
            bitmask[row].bitwise_and_(self.allowed_row)

    def replay(self, token_ids: Sequence[int]) -> bool:
        """Reset to the start and accept `token_ids`; False at the first rejected one."""
        self.matcher.reset()
        return all(self.accept(t) for t in token_ids)

    def fork(self) -> SequenceGrammar:
        """An independent copy at the same state (a child of an n > 1 request)."""
        return SequenceGrammar(self.compiled, self.stop_token_ids, self.matcher.fork(),
                               self.allowed_row)


@functools.lru_cache(maxsize=16)
def _stop_row(stop_token_ids: tuple[int, ...], vocab_size: int) -> torch.Tensor:
    return _pack_bits(torch.isin(torch.arange(vocab_size), torch.tensor(stop_token_ids)))


def _pack_bits(is_allowed: torch.Tensor) -> torch.Tensor:
    """bool `[vocab]` -> xgrammar's packed int32 `[ceil(vocab / 32)]` (bit j of word w: token 32w + j)."""
    num_words = -(-is_allowed.numel() // 32)
    bits = torch.zeros(num_words * 32, dtype=torch.int64)
    bits[:is_allowed.numel()] = is_allowed.long()
    words = (bits.view(num_words, 32) << torch.arange(32)).sum(dim=1)  # [num_words], < 2**32
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


_batch_matcher: xgr.BatchGrammarMatcher | None = None


def _batch() -> xgr.BatchGrammarMatcher:
    global _batch_matcher
    if _batch_matcher is None:  # its thread pool starts on first use, not at import
        _batch_matcher = xgr.BatchGrammarMatcher()
    return _batch_matcher


def apply_masks(logits: torch.Tensor, grammars: Sequence[SequenceGrammar | None]) -> None:
    """Mask `logits` `[num_rows, vocab]` in place: row i keeps only the tokens
    `grammars[i]` allows (others -> -inf); rows whose grammar is None are untouched.
    The same grammar object may stand in several rows (an n > 1 fan-out)."""
    num_rows, vocab = logits.shape
    assert len(grammars) == num_rows, (len(grammars), num_rows)
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return
    bitmask = xgr.allocate_token_bitmask(num_rows, vocab)  # [num_rows, ceil(vocab / 32)] int32
    first_row: dict[int, int] = {}  # id(grammar) -> the row its mask is filled in
    live_rows, live, copies = [], [], []
    for i in rows:
        g = grammars[i]
        assert g.vocab_size == vocab, (g.vocab_size, vocab)
        src = first_row.setdefault(id(g), i)
        if src != i:
            copies.append((i, src))
        elif g.is_terminated():
            g.fill_mask(bitmask, i)
        else:
            live_rows.append(i)
            live.append(g)
    if live:  # one call, multithreaded in xgrammar (cheaper than a Python loop even for one row)
        _batch().batch_fill_next_token_bitmask([g.matcher for g in live], bitmask, live_rows)
        # row by row: a 4k-word op stays on this thread, an indexed one may wake torch's pool
        for i, g in zip(live_rows, live):
            if g.allowed_row is not None:
                bitmask[i].bitwise_and_(g.allowed_row)
    for i, src in copies:
        bitmask[i].copy_(bitmask[src])
    if logits.device.type != "cpu":
        bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=rows)
