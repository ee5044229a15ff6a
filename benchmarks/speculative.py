"""Speculative decoding (prompt lookup) against plain decoding, one stream, in one run.

One mesh serves the model (SmolLM2-135M-Instruct by default) with the replica's
default off; each prompt is sent as an OpenAI chat request through Envoy twice,
once plain and once with `speculative_tokens: K` (the per-request opt-in), the
order alternating by prompt and round, one request at a time. Two workloads:
`grounded` (the answer copies from the prompt: repeat, correct, reformat or
quote a given passage, edit given code) and `chat` (free questions with nothing
to copy). Per workload and variant: the median over rounds of tokens/s (the
completion's tokens over the request's wall time, streamed to the end), the
acceptance rate (kept / drafted, from the scheduler's counters) and whether
every speculative answer equals the plain one (it must: greedy and seeded).
"""
from __future__ import annotations

import json
import statistics
import time
import urllib.request

from llmesh.benchmarks import kit

PASSAGE = ("The Great Barrier Reef is the world's largest coral reef system, composed of over "
           "2,900 individual reefs and 900 islands stretching for over 2,300 kilometres over an "
           "area of approximately 344,400 square kilometres. The reef is located in the Coral "
           "Sea, off the coast of Queensland, Australia. It can be seen from outer space and is "
           "the world's biggest single structure made by living organisms.")
MISSPELT = ("The libary opens at nine oclock every morning and closes at six in the evening. "
            "Vistors can borrow up to five books at a time, and childrens books are kept on "
            "the second floor next to the reading room. Please remember to retrun books on "
            "time, becuase late returns are charged a small fee.")
CODE = ("def total(items):\n    result = 0\n    for item in items:\n        result = result + "
        "item.price * item.quantity\n    return result\n\n\ndef average(items):\n    if not "
        "items:\n        return 0\n    return total(items) / len(items)\n")
GROUNDED = [
    f"Repeat the following text exactly, word for word:\n\n{PASSAGE}",
    f"Correct the spelling mistakes in this text and return the whole corrected text:\n\n"
    f"{MISSPELT}",
    f"{PASSAGE}\n\nRewrite the text above as a bulleted list of facts, keeping the wording.",
    f"{PASSAGE}\n\nWhere is the reef located, and how large is it? Answer by quoting the text.",
    f"Rename the function `total` to `order_total` everywhere in this code and return the "
    f"whole code:\n\n{CODE}",
]
CHAT = [
    "Write a short poem about autumn leaves.",
    "What are three good habits for staying healthy?",
    "Explain why the sky is blue to a ten year old.",
    "Give me a recipe idea for a quick vegetarian dinner.",
    "What should I pack for a weekend camping trip?",
]
WORKLOADS = {"grounded": GROUNDED, "chat": CHAT}


def _chat(endpoint: str, prompt: str, max_tokens: int, spec: int | None,
          sampling: dict) -> tuple[str, int, float]:
    """(text, completion tokens, seconds) of one streamed chat request."""
    body = {"model": "default", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, **sampling}
    if spec is not None:
        body["speculative_tokens"] = spec
    req = urllib.request.Request(f"http://{endpoint}/v1/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    text, tokens = [], 0
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices") or ():
                text.append(choice["delta"].get("content") or "")
    return "".join(text), tokens, time.perf_counter() - t0


def _counters(port: int) -> tuple[float, float]:
    from llmesh.mesh.commands import scrape
    m = scrape(port)
    return m.get("llmesh_spec_draft_tokens_total", 0.0), \
        m.get("llmesh_spec_accepted_tokens_total", 0.0)


def options(p) -> None:
    p.add_argument("--k", type=int, default=4, help="draft tokens a step (speculative_tokens)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy; else seeded sampling (seed 7)")
    p.add_argument("--ngram-max", type=int, default=4)
    p.add_argument("--ngram-min", type=int, default=2)
    p.add_argument("--dtype", default="auto")


def run(args) -> dict:
    sampling = {"temperature": args.temperature}
    if args.temperature:
        sampling["seed"] = 7
    engine = {"num_kv_blocks": 512, "dtype": args.dtype,
              "speculative_ngram_max": args.ngram_max, "speculative_ngram_min": args.ngram_min}
    rows: dict[str, dict[str, list]] = {w: {"plain": [], "spec": []} for w in WORKLOADS}
    counts = {w: [0.0, 0.0] for w in WORKLOADS}
    same = {w: True for w in WORKLOADS}
    with kit.BenchMesh(args.model, name="spec", engine=engine,
                       observability={"tracing": "off", "metrics": True}) as mesh:
        port = mesh.cfg.observability.metrics_ports["scheduler-0"]
        _chat(mesh.endpoint, CHAT[0], 8, None, sampling)  # (warm-up)
        for r in range(args.rounds):
            for w, prompts in WORKLOADS.items():
                toks = {"plain": [0, 0.0], "spec": [0, 0.0]}
                for i, prompt in enumerate(prompts):
                    order = ("plain", "spec") if (r + i) % 2 == 0 else ("spec", "plain")
                    texts = {}
                    for variant in order:
                        before = _counters(port)
                        text, n, secs = _chat(mesh.endpoint, prompt, args.max_tokens,
                                              args.k if variant == "spec" else 0, sampling)
                        after = _counters(port)
                        texts[variant] = text
                        toks[variant][0] += n
                        toks[variant][1] += secs
                        if variant == "spec":
                            counts[w][0] += after[0] - before[0]
                            counts[w][1] += after[1] - before[1]
                    same[w] = same[w] and texts["plain"] == texts["spec"]
                for variant, (n, secs) in toks.items():
                    rows[w][variant].append(n / secs)
                kit.log(f"round {r} {w}: plain {rows[w]['plain'][-1]:.1f} tok/s, "
                        f"spec {rows[w]['spec'][-1]:.1f} tok/s")
    out = {}
    for w in WORKLOADS:
        plain, spec = statistics.median(rows[w]["plain"]), statistics.median(rows[w]["spec"])
        drafts, kept = counts[w]
        out[w] = {"plain_tok_s": round(plain, 2), "spec_tok_s": round(spec, 2),
                  "speedup": round(spec / plain, 3), "rounds_plain": rows[w]["plain"],
                  "rounds_spec": rows[w]["spec"], "draft_tokens": drafts, "kept_tokens": kept,
                  "acceptance": round(kept / drafts, 3) if drafts else 0.0,
                  "identical_output": same[w]}
    return {"k": args.k, "sampling": sampling, "workloads": out}


def table(report: dict) -> str:
    lines = [f"k = {report['k']}, {report['sampling']}",
             "| workload | plain tok/s | speculative tok/s | speedup | acceptance | same output |",
             "|---|---|---|---|---|---|"]
    for w, r in report["workloads"].items():
        lines.append(f"| {w} | {r['plain_tok_s']:.1f} | {r['spec_tok_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['acceptance']:.0%} | {r['identical_output']} |")
    return "\n".join(lines)


SPEC = kit.Spec("speculative", __doc__, options, run, model="smollm2", table=table,
                passed=lambda r: all(w["identical_output"] for w in r["workloads"].values()))

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
