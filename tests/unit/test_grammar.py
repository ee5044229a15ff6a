"""Grammar-constrained decoding on the tiny model's real tokenizer: random logits, masks, greedy."""
import json
import re

import pytest
import torch

from llmesh.services.common.errors import InvalidRequestError
from llmesh.services.common.tokenizer import TextTokenizer
from llmesh.services.executor.grammar import GrammarCompiler, GrammarSpec, SequenceGrammar, apply_masks
from llmesh.services.executor.model_config import load_model_config

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "score", "active", "tags", "color"],
}
REGEX = r"(ACK|NAK)-[0-9]{3}-[a-z]{2,6}( [a-z]{1,5}){0,3}"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return TextTokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def eos_ids(tiny_model_dir):
    return load_model_config(tiny_model_dir).eos_token_ids


@pytest.fixture(scope="module")
def compiler(tiny_model_dir, tokenizer, eos_ids):
    return GrammarCompiler(tiny_model_dir, tokenizer.vocab_size, eos_ids)


@pytest.fixture(scope="module")
def closing_ids(tokenizer):
    """Tokens that only close or separate (`"`, `}`, `]`, `,`, `:`, `0`, space): a
    bias toward them ends random JSON within a few tokens."""
    ids = []
    for token_id in range(tokenizer.vocab_size):
        text = tokenizer.decode([token_id])
        if text and set(text) <= set('"}],:0 '):
            ids.append(token_id)
    assert len(ids) > 5
    return torch.tensor(ids)


def allowed(grammar: SequenceGrammar, vocab: int) -> set[int]:
    logits = torch.zeros(1, vocab)
    apply_masks(logits, [grammar])
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


def greedy(grammar, vocab, seed, closing_ids=None, bias_after=40, max_tokens=200):
    """Greedy decode of seeded random logits under `grammar`; after `bias_after`
    steps the closing tokens get a large bonus so unbounded grammars end."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(max_tokens):
        logits = torch.randn(1, vocab, generator=gen)
        if closing_ids is not None and step >= bias_after:
            logits[0, closing_ids] += 20.0
        apply_masks(logits, [grammar])
        token_id = int(logits.argmax())
        assert grammar.accept(token_id)
        out.append(token_id)
        if grammar.is_terminated():
            break
    return out


def check_schema_instance(obj):
    assert list(obj) == ["name", "age", "score", "active", "tags", "color"]
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 12
    assert isinstance(obj["age"], int) and not isinstance(obj["age"], bool) and 0 <= obj["age"] <= 150
    assert isinstance(obj["score"], (int, float)) and not isinstance(obj["score"], bool)
    assert isinstance(obj["active"], bool)
    assert isinstance(obj["tags"], list) and len(obj["tags"]) <= 3
    assert all(isinstance(t, str) and len(t) <= 8 for t in obj["tags"])
    assert obj["color"] in ("red", "green", "blue")


@pytest.mark.parametrize("seed", range(5))
def test_json_schema_random_logits_give_valid_instance(compiler, tokenizer, eos_ids, closing_ids, seed):
    grammar = compiler.sequence(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    out = greedy(grammar, tokenizer.vocab_size, seed, closing_ids)
    assert grammar.is_terminated() and out[-1] in eos_ids
    check_schema_instance(json.loads(tokenizer.decode(out)))


def test_json_object_mode_50_seeds(compiler, tokenizer, eos_ids, closing_ids):
    spec = GrammarSpec("json_object")
    num_keys = []
    for seed in range(50):
        grammar = compiler.sequence(spec)
        out = greedy(grammar, tokenizer.vocab_size, 1000 + seed, closing_ids)
        assert grammar.is_terminated(), seed
        assert out[-1] in eos_ids and not any(t in eos_ids for t in out[:-1])
        obj = json.loads(tokenizer.decode(out))
        assert isinstance(obj, dict), seed
        num_keys.append(len(obj))
    assert sum(n > 0 for n in num_keys) >= 30 and max(num_keys) >= 3  # not just "{}"


@pytest.mark.parametrize("seed", range(10))
def test_regex_output_fully_matches(compiler, tokenizer, seed):
    grammar = compiler.sequence(GrammarSpec("regex", REGEX))
    out = greedy(grammar, tokenizer.vocab_size, seed)
    assert grammar.is_terminated()
    assert re.fullmatch(REGEX, tokenizer.decode(out))


def test_ebnf_output(compiler, tokenizer):
    ebnf = 'root ::= "yes" | "no" | "maybe " [0-9]'
    for seed in range(10):
        grammar = compiler.sequence(GrammarSpec("ebnf", ebnf))
        text = tokenizer.decode(greedy(grammar, tokenizer.vocab_size, seed))
        assert re.fullmatch(r"yes|no|maybe [0-9]", text), text


def test_completed_grammar_allows_only_stop_tokens(compiler, tokenizer, eos_ids):
    vocab = tokenizer.vocab_size
    grammar = compiler.sequence(GrammarSpec("regex", "ok"))
    assert all(grammar.accept(t) for t in tokenizer.encode("ok", add_special_tokens=False))
    assert not grammar.is_terminated()
    assert allowed(grammar, vocab) == set(eos_ids)
    assert not grammar.accept(tokenizer.encode("x", add_special_tokens=False)[0])
    assert grammar.accept(eos_ids[0]) and grammar.is_terminated()
    # terminated: the mask stays stop-only and a repeated stop token is harmless
    assert allowed(grammar, vocab) == set(eos_ids)
    assert grammar.accept(eos_ids[0]) and not grammar.accept(10)


def test_special_and_padding_tokens_never_allowed(tiny_model_dir, tokenizer, eos_ids):
    vocab = tokenizer.vocab_size + 40  # an lm_head padded past the tokenizer
    compiler = GrammarCompiler(tiny_model_dir, vocab, eos_ids)
    grammar = compiler.sequence(GrammarSpec("json_object"),
                                tokenizer.encode('{"a": "', add_special_tokens=False))
    ids = allowed(grammar, vocab)
    assert len(ids) > 500  # inside a string almost anything goes...
    specials = {0, 1, 2, 3, 4}  # <|bos|> <|eos|> <|pad|> <|start|> <|end|>
    assert not ids & specials  # ...but not text spelled by special tokens
    assert not ids & set(range(tokenizer.vocab_size, vocab))


def test_invalid_specs_raise_invalid_request(compiler):
    cases = [
        GrammarSpec("json_schema", '{"type": "object", "properties": '),
        GrammarSpec("json_schema", '{"type": "strin"}'),
        GrammarSpec("json_schema", "[1, 2]"),
        GrammarSpec("json_schema", '{"$ref": "#/defs/missing"}'),
        GrammarSpec("json_object", '{"type": "object"}'),
        GrammarSpec("regex", "[a-"),
        GrammarSpec("regex", "(ab"),
        GrammarSpec("regex", r"(a)\1"),
        GrammarSpec("ebnf", 'root ::= "a" | '),
        GrammarSpec("ebnf", 'foo ::= "a"'),
        GrammarSpec("ebnf", ""),
        GrammarSpec("xml", "<a/>"),
        GrammarSpec("regex", "a" * 70_000),
        GrammarSpec("json_schema", '{"type": "array", "items": ' * 70 + "{}" + "}" * 70),  # too deep
    ]
    for spec in cases:
        with pytest.raises(InvalidRequestError) as err:
            spec.validate()
        assert err.value.field == ("grammar" if spec.kind in ("regex", "ebnf") else "response_format")
        assert "/project/cpp" not in err.value.message
        with pytest.raises(InvalidRequestError):
            compiler.compile(spec)
    with pytest.raises(InvalidRequestError, match="Unclosed"):
        GrammarSpec("regex", "[a-").validate()


def test_replay_matches_step_by_step(compiler, tokenizer, closing_ids):
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    vocab = tokenizer.vocab_size
    stepped = compiler.sequence(spec)
    out = greedy(stepped, vocab, seed=7, closing_ids=closing_ids)
    for cut in (0, 1, 5, len(out) // 2, len(out) - 1, len(out)):
        walker = compiler.sequence(spec)
        masks = []
        for t in out[:cut]:
            assert walker.accept(t)
        masks.append(allowed(walker, vocab))
        replayed = compiler.sequence(spec, out[:cut])
        assert allowed(replayed, vocab) == masks[0], cut
    # replay resets: a used grammar replayed on a prefix is at that prefix
    assert stepped.replay(out[:3]) and allowed(stepped, vocab) == allowed(compiler.sequence(spec, out[:3]), vocab)
    bad = [tokenizer.encode("x", add_special_tokens=False)[0]]
    assert not compiler.sequence(spec).replay(bad)
    with pytest.raises(ValueError):
        compiler.sequence(spec, bad)


def test_fork_is_independent(compiler, tokenizer):
    vocab = tokenizer.vocab_size
    parent = compiler.sequence(GrammarSpec("regex", "(cat|dog)s?"))
    assert parent.accept(tokenizer.encode("c", add_special_tokens=False)[0])
    before = allowed(parent, vocab)
    child = parent.fork()
    assert allowed(child, vocab) == before
    for t in tokenizer.encode("ats", add_special_tokens=False):
        assert child.accept(t)
    assert allowed(parent, vocab) == before  # the parent did not move
    assert allowed(child, vocab) != before
    assert parent.accept(tokenizer.encode("a", add_special_tokens=False)[0])


def test_unconstrained_rows_untouched_and_batch_matches_single(compiler, tokenizer, closing_ids):
    vocab = tokenizer.vocab_size
    specs = [GrammarSpec("json_schema", json.dumps(SCHEMA)), GrammarSpec("json_object"),
             GrammarSpec("regex", REGEX)]
    grammars = []
    for i in range(12):  # enough constrained rows to take the batched fill
        g = compiler.sequence(specs[i % 3])
        greedy(g, vocab, seed=i, closing_ids=closing_ids, max_tokens=3 + i)
        grammars.append(g)
    rows = [None, grammars[0], None] + grammars[1:] + [grammars[0], None]  # grammars[0] twice
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(3))
    original = logits.clone()
    apply_masks(logits, rows)
    for i, g in enumerate(rows):
        if g is None:
            assert torch.equal(logits[i], original[i])
            continue
        single = original[i:i + 1].clone()
        apply_masks(single, [g])
        assert torch.equal(logits[i], single[0])
        kept = logits[i] != float("-inf")
        assert torch.equal(logits[i][kept], original[i][kept]) and 0 < int(kept.sum()) < vocab
    apply_masks(logits, [None] * len(rows))  # nothing constrained: nothing touched


def test_compile_cache_is_lru_by_spec(tiny_model_dir, tokenizer, eos_ids):
    compiler = GrammarCompiler(tiny_model_dir, tokenizer.vocab_size, eos_ids, max_cached=2)
    a, b, c = (GrammarSpec("regex", r) for r in ("a+", "b+", "c+"))
    compiled_a = compiler.compile(a)
    assert compiler.compile(GrammarSpec("regex", "a+")) is compiled_a
    compiler.compile(b)
    compiler.compile(a)  # a is now the most recent: c evicts b
    compiler.compile(c)
    assert compiler.num_cached == 2
    assert compiler.compile(a) is compiled_a
    assert compiler.compile(b) is not None and compiler.num_cached == 2


def test_compile_async(tiny_model_dir, tokenizer, eos_ids):
    compiler = GrammarCompiler(tiny_model_dir, tokenizer.vocab_size, eos_ids)
    try:
        spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
        futures = [compiler.compile_async(spec) for _ in range(3)]
        compiled = futures[0].result(timeout=30)
        assert all(f.result(timeout=30) is compiled for f in futures)
        assert compiler.compile(spec) is compiled
        done = compiler.compile_async(spec)
        assert done.done() and done.result() is compiled
        with pytest.raises(InvalidRequestError):
            compiler.compile_async(GrammarSpec("regex", "(ab")).result(timeout=30)
    finally:
        compiler.close()


def test_json_strings_never_take_raw_control_characters(compiler, tokenizer):
    """xgrammar lets a maxLength string take raw control characters (invalid JSON)."""
    vocab = tokenizer.vocab_size
    control = {t for t in range(vocab) if any(ord(ch) < 0x20 for ch in tokenizer.decode([t]))}
    assert len(control) >= 30
    grammar = compiler.sequence(GrammarSpec("json_schema", json.dumps(SCHEMA)),
                                tokenizer.encode('{"name": "', add_special_tokens=False))
    assert not allowed(grammar, vocab) & control
    assert not allowed(grammar.fork(), vocab) & control
    # regex grammars keep them: a newline is ordinary text there
    lines = compiler.sequence(GrammarSpec("regex", "[a-z]+\n[a-z]+"), tokenizer.encode("ab", add_special_tokens=False))
    assert allowed(lines, vocab) & control
