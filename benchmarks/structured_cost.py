"""What structured output costs: the same requests with and without a JSON schema.

The in-process Engine (the step path every executor runs) generates a batch of
requests constrained by a JSON schema, then the same prompts unconstrained with
`max_tokens` set to each constrained output's length and `ignore_eos`, so both
runs compute exactly the same number of tokens in the same batches. Rounds
alternate the order; the ratio of output tokens per second (median over rounds)
is the cost of the grammar (mask fill on the CPU, its application, token
acceptance).
"""
from __future__ import annotations

import json
import statistics
import time

from llmesh.benchmarks import kit

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["title", "year", "rating", "genres", "summary"],
          "properties": {"title": {"type": "string", "maxLength": 40},
                         "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                         "rating": {"enum": ["G", "PG", "PG-13", "R"]},
                         "genres": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                    "maxItems": 4},
                         "summary": {"type": "string", "maxLength": 160}}}


def _timed(engine, prompts, params) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = engine.generate(prompts, params, priority="batch")
    return time.perf_counter() - t0, out


def options(p) -> None:
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)


def run(args) -> dict:
    from llmesh.services.common.grammar_spec import GrammarSpec
    from llmesh.services.common.sampling_params import SamplingParams
    from llmesh.services.engine.engine import Engine, EngineConfig
    engine = Engine.from_pretrained(args.model, EngineConfig(kv_cache_bytes=1 << 30))
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    prompts = [[1] + [(17 * i + 31 * j) % 3000 + 5 for j in range(48)]
               for i in range(args.num_requests)]
    constrained = [SamplingParams(max_tokens=256, temperature=1.0, seed=i, grammar=spec)
                   for i in range(args.num_requests)]
    engine.generate(prompts[:2], constrained[:2])  # warm: compile the grammar, first steps
    rows = []
    for r in range(args.rounds):
        order = ("schema", "free") if r % 2 == 0 else ("free", "schema")
        times, lengths = {}, None
        if order[0] == "free":  # the lengths come from a constrained run: measure it first once
            _, out = _timed(engine, prompts, constrained)
            lengths = [len(o[0].token_ids) for o in out]
        for kind in order:
            if kind == "schema":
                times["schema"], out = _timed(engine, prompts, constrained)
                valid = sum(_is_json(o[0].text) for o in out)
                lengths = lengths or [len(o[0].token_ids) for o in out]
            else:
                free = [SamplingParams(max_tokens=n, temperature=1.0, seed=i, ignore_eos=True)
                        for i, n in enumerate(lengths)]
                times["free"], _ = _timed(engine, prompts, free)
        tokens = sum(lengths)
        rows.append({"tokens": tokens, "valid_json": valid,
                     "schema_tok_s": tokens / times["schema"], "free_tok_s": tokens / times["free"],
                     "ratio": times["free"] / times["schema"]})
        kit.log(f"round {r + 1}: {rows[-1]}")
    engine.close()
    return {"rounds": rows, "median_ratio": statistics.median(r["ratio"] for r in rows),
            "median_schema_tok_s": statistics.median(r["schema_tok_s"] for r in rows),
            "median_free_tok_s": statistics.median(r["free_tok_s"] for r in rows)}


def _is_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


SPEC = kit.Spec("structured_cost", __doc__, options, run, model="bench")

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
