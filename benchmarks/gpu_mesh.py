"""The mesh's replica on a GPU against the in-process engine, on one workload.

A random checkpoint of `--shape` (default llama-1b; a word-level tokenizer over its
whole vocabulary is written beside it, since the scheduler streams text) runs:
- in the in-process Engine, as `llmesh bench gpu` configures it (every request
  running at once, KV blocks for all of them, CUDA graphs);
- as one replica of the mesh: an executor process and a scheduler process with the
  same engine settings (pipeline depth 2, tracing off), the requests sent as a router
  sends them, on one Connect stream straight to the scheduler (no Envoy or router:
  the device image has no Envoy binary, and carrying one is over the size limit).
Both get the same requests (`--requests` x (`--prompt-tokens` + `--output-tokens`),
greedy, ignore_eos, all at once); `--rounds` alternating runs, output tokens/s from
the first request sent to the last token back. Goal (issue 30): mesh >= 0.95x engine.
Greedy tokens of the two are compared request by request.

`--device cpu --shape tiny-llama --dtype float32` tries it here (the GPU session's
dry run).
"""
from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from llmesh.benchmarks import gpu_shapes, kit


def write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer naming every id, so any sampled token has a text."""
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    tok.save(str(out_dir / "tokenizer.json"))


def engine_run(ckpt, config, requests) -> tuple[float, dict[int, list[int]]]:
    from llmesh.services.common.sampling_params import SamplingParams
    from llmesh.services.engine.engine import Engine
    engine = Engine.from_pretrained(ckpt, config)
    engine.generate([requests[0].prompt_token_ids], SamplingParams(max_tokens=4, ignore_eos=True))
    params = [SamplingParams(max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    t0 = time.perf_counter()
    out = engine.generate([r.prompt_token_ids for r in requests], params)
    seconds = time.perf_counter() - t0
    engine.close()
    tokens = {i: c[0].token_ids for i, c in enumerate(out)}
    return sum(map(len, tokens.values())) / seconds, tokens


async def _send_all(address: str, requests, tag: str) -> tuple[float, dict[int, list[int]]]:
    import grpc
    from llmesh.services.common import convert
    from llmesh.services.common.sampling_params import SamplingParams
    from llmesh.v1 import scheduler_pb2, scheduler_pb2_grpc
    tokens: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    async with grpc.aio.insecure_channel(address) as ch:
        call = scheduler_pb2_grpc.SchedulerStub(ch).Connect()
        t0 = time.perf_counter()
        for i, r in enumerate(requests):
            params = convert.sampling_to_wire(SamplingParams(max_tokens=r.max_tokens,
                                                             ignore_eos=True))
            await call.write(scheduler_pb2.RouterMessage(add=scheduler_pb2.AddRequest(
                request_id=f"{tag}-{i}", prompt_token_ids=r.prompt_token_ids, sampling=params,
                priority=2)))
        open_requests = len(requests)
        async for outputs in call:
            for d in outputs.deltas:
                tokens[int(d.request_id.rsplit("-", 1)[1])].extend(d.new_token_ids)
                open_requests -= d.finish_reason != 0
            if not open_requests:
                break
        seconds = time.perf_counter() - t0
        call.cancel()
    return sum(map(len, tokens.values())) / seconds, tokens


class Replica:
    """One replica's executor and scheduler processes (mesh/supervisor.py's specs)."""

    def __init__(self, ckpt, config, run_dir: Path):
        from llmesh.mesh.config import parse_config
        from llmesh.mesh.ports import free_port
        from llmesh.mesh.supervisor import Supervisor, replica_specs
        self.cfg = parse_config({
            "engine": {"device": config.device, "dtype": config.dtype,
                       "block_size": config.block_size, "num_kv_blocks": config.num_kv_blocks,
                       "max_num_batched_tokens": config.max_num_batched_tokens,
                       "max_num_seqs": config.max_num_seqs, "probe_interval_s": 0,
                       "leak_check_s": 0, "step_timeout_s": 600},
            "observability": {"tracing": "off", "metrics": False},
            "kvcache_port": free_port(),  # (nothing listens: the scheduler only reconnects)
            "replica_ports": [{"scheduler": free_port(), "executors": [free_port()],
                               "index": 0}]})
        ports = self.cfg.replica_ports[0]
        self.address = f"127.0.0.1:{ports.scheduler}"
        self.supervisor = Supervisor(replica_specs(self.cfg, ports, str(ckpt)), run_dir)

    def __enter__(self) -> "Replica":
        self.supervisor.start(timeout_s=600)
        return self

    def __exit__(self, *exc) -> None:
        self.supervisor.stop()


def options(p) -> None:
    p.add_argument("--shape", default="llama-1b", choices=sorted(gpu_shapes.SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--requests", type=int, help="default: the shape's")
    p.add_argument("--prompt-tokens", type=int, help="default: the shape's")
    p.add_argument("--output-tokens", type=int, help="default: the shape's")
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)


def run(args) -> dict:
    import torch

    from llmesh.benchmarks.gpu_bench import engine_config, make_requests
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA device on this machine (use --device cpu for a dry run)")
    shape = gpu_shapes.SHAPES[args.shape]
    n = args.requests or shape.requests
    prompt = args.prompt_tokens or shape.prompt_tokens
    output = args.output_tokens or shape.output_tokens
    args.warmup_steps = args.decode_steps = args.profile_steps = 0  # (engine_config's sizing)
    config = engine_config(args, n, prompt, output, [])
    requests = make_requests(n, prompt, output, shape.vocab_size, args.seed)
    rows: dict[str, list[float]] = {"engine": [], "mesh": []}
    tokens: dict[str, dict[int, list[int]]] = {}
    with tempfile.TemporaryDirectory(prefix="llmesh-gpu-mesh-") as tmp:
        ckpt = Path(tmp) / "model"
        made = gpu_shapes.make_checkpoint(shape, ckpt, args.device, args.dtype, args.seed)
        write_tokenizer(ckpt, shape.vocab_size)
        with Replica(ckpt, config, Path(tmp) / "run") as replica:
            asyncio.run(_send_all(replica.address, requests[:2], "warm"))
            for r in range(args.rounds):
                order = ["engine", "mesh"] if r % 2 == 0 else ["mesh", "engine"]
                for name in order:
                    if name == "engine":
                        tps, got = engine_run(ckpt, config, requests)
                    else:
                        tps, got = asyncio.run(_send_all(replica.address, requests, f"r{r}"))
                    rows[name].append(tps)
                    tokens[name] = got
                    kit.log(f"[gpu_mesh] round {r + 1} {name}: {tps:,.0f} output tok/s")
    same = sum(tokens["engine"][i] == tokens["mesh"][i] for i in range(n))
    engine_tps, mesh_tps = statistics.median(rows["engine"]), statistics.median(rows["mesh"])
    return {"shape": shape.name, "device": args.device, "dtype": args.dtype,
            "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
            "checkpoint_params": made["num_params"],
            "workload": {"requests": n, "prompt_tokens": prompt, "output_tokens": output},
            "engine_config": {k: getattr(config, k) for k in (
                "num_kv_blocks", "max_num_batched_tokens", "max_num_seqs", "pipeline_depth")},
            "output_tokens_per_s": rows, "engine_median": engine_tps, "mesh_median": mesh_tps,
            "mesh_over_engine": mesh_tps / engine_tps, "goal": 0.95,
            "identical_requests": same, "requests": n}


SPEC = kit.Spec("gpu_mesh", __doc__, options, run, model=None)

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
