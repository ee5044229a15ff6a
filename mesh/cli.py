"""`llmesh` command line: model tools, local generation, and the commands other parts of
the package register under the `llmesh.cli` entry point group (pyproject.toml)."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys

from llmesh.services.common.errors import LlmeshError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmesh", description="LLM inference as a gRPC mesh")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="model tools").add_subparsers(dest="model_cmd", required=True)
    mk = model.add_parser("make-tiny", help="write the deterministic tiny Llama checkpoint")
    mk.add_argument("dir")
    mk.add_argument("--preset", default="tiny", choices=["tiny", "bench"])

    up = sub.add_parser("up", help="bring the mesh up (Envoy + every service)")
    up.add_argument("--config", help="mesh.yaml (default: the built-in one)")
    up.add_argument("--detach", action="store_true", help="run in the background")
    up.add_argument("--timeout", type=float, default=300.0)
    down = sub.add_parser("down", help="stop the mesh brought up with --detach")
    down.add_argument("--config")
    down.add_argument("--timeout", type=float, default=30.0,
                      help="seconds the supervisor has to stop every process; after them "
                           "it and what it ran are killed (exit status 1)")
    status = sub.add_parser("status", help="health, queue depth and KV usage per replica")
    status.add_argument("--config")
    status.add_argument("--json", action="store_true")
    scale = sub.add_parser("scale", help="add or remove replicas while the mesh runs "
                                         "(new ones join once SERVING, removed ones drain)")
    scale.add_argument("--replicas", type=int, required=True,
                       help="regular replicas wanted (warm standbys not counted)")
    scale.add_argument("--model", default="",
                       help="the model to scale (a name from mesh.yaml's models:); "
                            "default: the top-level model")
    scale.add_argument("--config")
    scale.add_argument("--timeout", type=float, default=300.0)
    config = sub.add_parser("config", help="mesh config").add_subparsers(dest="config_cmd",
                                                                         required=True)
    show = config.add_parser("show", help="print the effective mesh.yaml, defaults filled in")
    show.add_argument("--config")
    tr = sub.add_parser("trace", help="one request's trace as a waterfall (local span file)")
    tr.add_argument("request_id", nargs="?", help="the request id (see --last)")
    tr.add_argument("--last", action="store_true", help="the latest request")
    tr.add_argument("--json", action="store_true", help="the spans as a JSON list")
    tr.add_argument("--file", help="span file (default: RUN_DIR/traces.jsonl)")
    tr.add_argument("--config")

    gen = sub.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("--local", action="store_true", help="run the in-process Engine")
    gen.add_argument("--config", help="mesh.yaml of the running mesh")
    gen.add_argument("--endpoint", help="host:port of Envoy (default: the running mesh)")
    gen.add_argument("--tls", action="store_true",
                     help="the endpoint speaks TLS (the running mesh: from its state)")
    gen.add_argument("--tls-ca", help="PEM file of the certificate to trust (default: the "
                     "running mesh's self-signed one, else the system's roots)")
    gen.add_argument("--timeout", type=float, default=300.0)
    gen.add_argument("--model", help="with --local: a Hugging Face directory, a .gguf file, tiny or "
                     "bench (default: SmolLM2-135M-Instruct); on a mesh: the served model's "
                     "name (default: its top-level model)")
    gen.add_argument("--prompt", required=True, help="sent as one user message through the "
                     "model's chat template")
    gen.add_argument("--raw", action="store_true",
                     help="send --prompt as plain text to complete, without the chat template")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--speculative-tokens", type=int,
                     help="speculative decoding: draft tokens a step (0 = off; default: the "
                     "replica's)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto",
                                                                "int8", "float16-weights"])
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end")
    gen.add_argument("--api-key", help="API key of a keyed mesh (default: $LLMESH_API_KEY)")
    gen.add_argument("--priority", choices=["interactive", "standard", "batch"],
                     help="priority class (default: the tenant's)")
    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_cmd", required=True)
    new = keys.add_parser("new", help="make a key and print it with its hash for the keys file")
    new.add_argument("--json", action="store_true")

    from llmesh.mesh.deadletters_cli import add_parser as add_deadletters_parser
    add_deadletters_parser(sub)

    for plugin in importlib.metadata.entry_points(group="llmesh.cli"):
        plugin.load()(sub)  # adds its subcommand; the parser's `run` default handles it

    args = parser.parse_args(argv)
    try:
        if args.command == "trace":
            from llmesh.mesh.commands import cmd_trace
            return cmd_trace(args)
        if args.command == "keys":
            from llmesh.mesh.commands import cmd_keys_new
            return cmd_keys_new(args)
        if args.command == "deadletters":
            from llmesh.mesh.deadletters_cli import cmd_deadletters
            return cmd_deadletters(args)
        if args.command == "model":
            from llmesh.mesh.default_model import make_tiny
            print(make_tiny(args.dir, args.preset))
            return 0
        if args.command == "generate":
            if not args.local:
                from llmesh.mesh.commands import cmd_generate_mesh
                return cmd_generate_mesh(args)
            return _generate(args)
        if args.command in ("up", "down", "status", "config", "scale"):
            from llmesh.mesh import commands
            handler = {"up": commands.cmd_up, "down": commands.cmd_down,
                       "status": commands.cmd_status, "config": commands.cmd_config_show,
                       "scale": commands.cmd_scale}
            return handler[args.command](args)
        if getattr(args, "run", None) is not None:
            return args.run(args)
    except (LlmeshError, ValueError) as e:
        print(f"llmesh: error: {e}", file=sys.stderr)
        return 2
    return 1


def _generate(args) -> int:
    from llmesh.mesh.default_model import resolve_model
    from llmesh.services.common.sampling_params import SamplingParams
    from llmesh.services.engine.engine import Engine, EngineConfig
    from llmesh.services.common.tokenizer import TextTokenizer

    model_dir = resolve_model(args.model)
    engine = Engine.from_pretrained(model_dir, EngineConfig(dtype=args.dtype))
    tokenizer = TextTokenizer(model_dir)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            ignore_eos=args.ignore_eos,
                            speculative_tokens=args.speculative_tokens)
    prompt = tokenizer.encode(args.prompt) if args.raw else \
        tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    request_id = engine.add_request(prompt, params)
    token_ids, text, finish = [], [], None
    while engine.has_unfinished():
        for out in engine.step():  # the engine's outputs carry their text
            if out.request_id != request_id:
                continue
            token_ids.extend(out.new_token_ids)
            if out.finish_reason is not None:
                finish = out.finish_reason.value
            text.append(out.text)
            if not args.json:
                sys.stdout.write(out.text)
                sys.stdout.flush()
    if args.json:
        print(json.dumps({"token_ids": token_ids, "text": "".join(text), "finish_reason": finish}))
    else:
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
