"""A scripted agent through the official `openai` client: does every turn parse?

One mesh serves the model (SmolLM2-135M-Instruct by default) behind Envoy. For
each task (a question that needs one of two tools: the weather in a city, the
time in a zone) the agent runs the loop every agent framework runs: a chat turn
with the tools (`tool_choice` `required`, `required-single` (required with
`parallel_tool_calls: false`), or `auto`: the model decides), the tool's result
sent back as a `tool` message for each call, then a turn for the
answer (`auto` again: the model may call once more, or answer in words), up to
`--max-turns`. Counted per mode: tasks, turns, tool calls, calls whose
arguments parse as JSON and fit the function's schema (the right keys, string
values), turns whose output could not be read (an error, a call cut short by
`max_tokens`, or a malformed call left in the text; each kept in the results
file) and tasks that ended with an answer in words. Greedy.
"""
from __future__ import annotations

import json

from llmesh.benchmarks import kit

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "current_time", "description": "The time now in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                   "required": ["zone"], "additionalProperties": False}}}
KEYS = {"get_weather": {"city"}, "current_time": {"zone"}}
CITIES = ["Paris", "Tokyo", "Oslo", "Lima", "Cairo", "Sydney", "Toronto", "Madrid", "Seoul",
          "Nairobi"]


def _tasks() -> list[str]:
    out = []
    for city in CITIES:
        out.append(f"What is the weather like in {city} right now?")
        out.append(f"What time is it in {city}?")
    return out


def _tool_result(name: str, args: dict) -> str:
    if name == "get_weather":
        return json.dumps({"city": args.get("city"), "sky": "cloudy", "temperature_c": 17})
    return json.dumps({"zone": args.get("zone"), "time": "14:05"})


def _fits(name: str, arguments: str) -> bool:
    try:
        args = json.loads(arguments)
    except ValueError:
        return False
    return (isinstance(args, dict) and set(args) == KEYS.get(name, set())
            and all(isinstance(v, str) and v for v in args.values()))


def _agent(client, task: str, mode: str, max_turns: int, max_tokens: int, counts: dict,
           unreadable: list) -> None:
    messages = [{"role": "user", "content": task}]
    choice = "required" if mode.startswith("required") else mode
    extra = {"parallel_tool_calls": False} if mode == "required-single" else {}
    for turn in range(max_turns):
        counts["turns"] += 1
        try:
            resp = client.chat.completions.create(
                model="default", messages=messages, tools=[WEATHER, CLOCK], tool_choice=choice,
                max_tokens=max_tokens, temperature=0, **extra)
        except Exception as e:  # counted: an unreadable turn
            counts["errors"] += 1
            unreadable.append({"task": task, "turn": turn, "error": str(e)[:300]})
            return
        msg, finish = resp.choices[0].message, resp.choices[0].finish_reason
        cut = choice == "required" and finish == "length" and not msg.tool_calls
        if cut or "<tool_call>" in (msg.content or ""):
            counts["cut_by_max_tokens" if cut else "malformed_in_text"] += 1
            unreadable.append({"task": task, "turn": turn, "finish_reason": finish,
                               "content": (msg.content or "")[:300]})
        if not msg.tool_calls:
            counts["answers"] += bool((msg.content or "").strip())
            return
        messages.append({"role": "assistant", "content": msg.content,
                         "tool_calls": [c.model_dump() for c in msg.tool_calls]})
        for call in msg.tool_calls:
            counts["calls"] += 1
            ok = _fits(call.function.name, call.function.arguments)
            counts["calls_parsed"] += ok
            args = json.loads(call.function.arguments) if ok else {}
            messages.append({"role": "tool", "tool_call_id": call.id,
                             "content": _tool_result(call.function.name, args)})
        choice, extra = "auto", {}


def options(p) -> None:
    p.add_argument("--modes", default="required,required-single,auto",
                   help="tool_choice of each task's first turn")
    p.add_argument("--max-turns", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)


def run(args) -> dict:
    import openai
    out = {}
    with kit.BenchMesh(args.model, name="agent", engine={"num_kv_blocks": 512}) as mesh:
        client = openai.OpenAI(base_url=f"http://{mesh.endpoint}/v1", api_key="none",
                               max_retries=0, timeout=300)
        for mode in args.modes.split(","):
            counts = dict.fromkeys(("tasks", "turns", "calls", "calls_parsed", "errors",
                                    "cut_by_max_tokens", "malformed_in_text", "answers"), 0)
            unreadable: list[dict] = []
            for task in _tasks():
                counts["tasks"] += 1
                _agent(client, task, mode, args.max_turns, args.max_tokens, counts, unreadable)
            kit.log(f"{mode}: {counts}")
            out[mode] = {**counts, "unreadable": unreadable}
    return {"modes": out}


def table(report: dict) -> str:
    lines = ["| first turn | tasks | turns | tool calls | calls that parse and fit | "
             "unreadable turns (error or cut + malformed) | answered in words |", "|---|---|---|---|---|---|---|"]
    for mode, c in report["modes"].items():
        lines.append(f"| {mode} | {c['tasks']} | {c['turns']} | {c['calls']} | "
                     f"{c['calls_parsed']} | {c['errors'] + c['cut_by_max_tokens']} + "
                     f"{c['malformed_in_text']} | "
                     f"{c['answers']} |")
    return "\n".join(lines)


SPEC = kit.Spec("agent_loop", __doc__, options, run, model="smollm2", table=table,
                passed=lambda r: all(c["calls"] == c["calls_parsed"] and not c["errors"]
                                     for c in r["modes"].values()))

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
