"""Quick overload probes: several request kinds flooded by h2load at one rate; statuses only."""
import collections, json, sys, time
from llmesh.benchmarks import h2load, kit
from llmesh.mesh.default_model import resolve_model
rate = float(sys.argv[1]) if len(sys.argv) > 1 else 300
ids = [0] + [7 * j % 2900 + 5 for j in range(40)]
KINDS = {
    "chat-stream": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story about a cat"}], "max_tokens": 32, "stream": True}),
    "chat-json": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Give me a person"}], "max_tokens": 32,
                  "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}}),
    "completions-n2": ("/v1/completions", {"prompt": ids, "max_tokens": 32, "n": 2, "stream": True, "temperature": 0.8, "seed": 1}),
    "completions-whole": ("/v1/completions", {"prompt": ids, "max_tokens": 32}),
    "chat-tools": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "weather in Paris?"}], "max_tokens": 32,
                   "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]}),
}
with kit.BenchMesh(resolve_model("tiny"), engine={"num_kv_blocks": 256, "enable_prefix_caching": False}) as mesh:
    for kind, (path, body) in KINDS.items():
        proc, log = h2load.start(f"http://{mesh.endpoint}{path}", body, rate, 6, {}, mesh.run_dir)
        rows, rep = h2load.finish(proc, log, 300)
        st = collections.Counter(r["status"] for r in rows)
        print(kind, dict(st), "logged", len(rows), "of", int(rate * 6), flush=True)
        time.sleep(3)
