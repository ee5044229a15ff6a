"""Chaos benchmark: a kill every few seconds across process types, under load.

A mesh with two routers and two replicas runs a closed loop of seeded requests
with known answers (the in-process engine's tokens for the same prompts and
parameters): half greedy, half sampled with a seed, half sent as text (the
tokenizer encodes them) and half as token ids, all through Envoy (with two
replicas the routers ask the kvcache index where each prompt's prefix is),
each read by a client that resumes a stream the front door drops
(`llmesh.mesh.client.ResumingStream`), or
with `--clients plain` by a plain gRPC stub that does not (as grpcurl or any
generated client: what a fault costs those who never resume). Every
`--kill-every` seconds the next victim in the list gets SIGKILL; the supervisor
restarts it. The report counts requests that failed (any error the client saw
in the end), also by the victim of the last kill before each failure, that came
back with other tokens than the known answer, and that had to resume; and the
pause a fault adds: per request, the longest wait for a
token (the first included), for requests in flight during a kill against those
that were not.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from llmesh.benchmarks import kit

VICTIMS = "executor-0-0,scheduler-0,tokenizer-0,kvcache,router-0,envoy"


def known_answers(model_dir: str, num: int, seed: int = 3):
    """`num` requests with the in-process engine's answers: even ones as text (the
    router asks the tokenizer to encode them), odd ones as token ids, all sharing a
    system prefix (prefix-cache hits, and with two replicas the router asks the
    kvcache index where it is cached)."""
    from llmesh.services.common.sampling_params import SamplingParams
    from llmesh.services.common.tokenizer import TextTokenizer
    from llmesh.services.engine.engine import Engine, EngineConfig
    rng = random.Random(seed)
    words = "the keeper lit the lamp at dusk and wound the weight before the storm".split()
    system = " ".join(rng.choices(words, k=40))
    texts = [f"{system} {' '.join(rng.choices(words, k=rng.randint(1, 30)))}" for _ in range(num)]
    tok = TextTokenizer(model_dir)
    prompts = [tok.encode(t) for t in texts]
    params = [SamplingParams(max_tokens=rng.randint(16, 64), ignore_eos=True, seed=900 + i,
                             temperature=0.8 if i % 2 else 0.0, top_p=0.95) for i in range(num)]
    engine = Engine.from_pretrained(model_dir, EngineConfig(num_kv_blocks=1024))
    expect = [c[0].token_ids for c in engine.generate(prompts, params)]
    engine.close()
    return [t if i % 2 == 0 else p for i, (t, p) in enumerate(zip(texts, prompts))], params, expect


class PlainStream:
    """One Generate call, read as it comes: no retry, no resume."""

    def __init__(self, endpoint: str, req):
        self.endpoint, self.req = endpoint, req
        self.received: list[int] = []
        self.attempts = 1

    def __iter__(self):
        import grpc
        from llmesh.v1 import inference_pb2_grpc
        with grpc.insecure_channel(self.endpoint) as ch:
            for chunk in inference_pb2_grpc.InferenceStub(ch).Generate(self.req, timeout=120):
                self.received.extend(chunk.token_ids)
                yield chunk


def run_chaos(mesh: kit.BenchMesh, answers, duration_s: float, kill_every_s: float,
              victims: list[str], concurrency: int, resume: bool = True) -> dict:
    import grpc
    from llmesh.mesh.client import ResumingStream
    prompts, params, expect = answers
    stop_at = time.monotonic() + duration_s
    counter = iter(range(10**9))
    lock = threading.Lock()
    records, kills = [], []

    def worker() -> None:
        while time.monotonic() < stop_at:
            with lock:
                i = next(counter) % len(prompts)
            p = params[i]
            req = kit.request(prompts[i], p.max_tokens, temperature=p.temperature,
                              top_p=p.top_p, seed=p.seed)
            stream = ResumingStream(mesh.endpoint, req, give_up_s=120) if resume else \
                PlainStream(mesh.endpoint, req)
            t0 = last = time.monotonic()
            longest, status = 0.0, "OK"
            try:
                for chunk in stream:
                    if chunk.token_ids:
                        now = time.monotonic()
                        longest, last = max(longest, now - last), now
            except grpc.RpcError as e:
                status = e.code().name
            records.append({"i": i, "start": t0, "end": time.monotonic(), "status": status,
                            "correct": stream.received == expect[i],
                            "attempts": stream.attempts, "longest_wait_s": longest})

    def killer() -> None:
        n = 0
        while not stop_evt.wait(kill_every_s):
            victim = victims[n % len(victims)]
            n += 1
            pid = mesh.pids().get(victim)
            if pid:
                os.kill(pid, signal.SIGKILL)
                kills.append((time.monotonic(), victim))
                kit.log(f"[chaos] killed {victim} (pid {pid})")

    stop_evt = threading.Event()
    kill_thread = threading.Thread(target=killer, daemon=True)
    kill_thread.start()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    stop_evt.set()
    kill_thread.join()
    hit = [r for r in records if any(r["start"] <= t <= r["end"] for t, _ in kills)]
    calm = [r for r in records if r not in hit]
    # a failure is charged to the last kill before it: "in_flight" if the request had
    # started before that kill, "sent_after" if it was sent while the victim was down
    # (a closed loop: a client that fails at once sends its next request at once)
    lost = {v: {"in_flight": 0, "sent_after": 0} for v in victims}
    for r in records:
        if r["status"] != "OK":
            before = [(t, v) for t, v in kills if t <= r["end"]]
            t, v = before[-1] if before else (0.0, "none")
            lost.setdefault(v, {"in_flight": 0, "sent_after": 0})[
                "in_flight" if r["start"] <= t else "sent_after"] += 1
    return {
        "clients": "resuming" if resume else "plain",
        "requests": len(records),
        "failed": sum(r["status"] != "OK" for r in records),
        "failed_by_last_kill": lost,
        "failed_statuses": sorted({r["status"] for r in records if r["status"] != "OK"}),
        "wrong": sum(r["status"] == "OK" and not r["correct"] for r in records),
        "resumed": sum(r["attempts"] > 1 for r in records),
        "kills": [v for _, v in kills],
        "longest_wait_in_flight_during_a_kill": kit.percentiles([r["longest_wait_s"] for r in hit]),
        "longest_wait_otherwise": kit.percentiles([r["longest_wait_s"] for r in calm]),
    }


def options(p) -> None:
    p.add_argument("--duration", type=float, default=300.0)
    p.add_argument("--kill-every", type=float, default=20.0)
    p.add_argument("--victims", default=VICTIMS)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--clients", choices=["resuming", "plain"], default="resuming")
    p.add_argument("--requests", type=int, default=64, help="distinct prompts (cycled)")


def run(args) -> dict:
    answers = known_answers(args.model, args.requests)
    with kit.BenchMesh(args.model, routers=2, replicas=2, engine={"num_kv_blocks": 1024}) as mesh:
        return run_chaos(mesh, answers, args.duration, args.kill_every, args.victims.split(","),
                         args.concurrency, args.clients == "resuming")


SPEC = kit.Spec("chaos", __doc__, options, run,
                passed=lambda r: not r["failed"] and not r["wrong"])

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
