"""The compose mesh, for real: compose/docker-compose.yml with compose/test's override
(the project's collector instead of Jaeger, Debian's Prometheus, no Grafana), built
on a local Debian base, brought up with docker-compose, then checked end to end:

- every service's container is healthy (each says SERVING), and Envoy's public port
  answers the gRPC health check, as clients see it;
- a streamed Generate through Envoy returns exactly the tokens the in-process Engine
  makes for the same greedy request on the same model (run in the same image), and
  the HTTP API answers through Envoy too;
- that request's trace reached the collector with spans from every service on its
  path (Envoy, router, tokenizer, scheduler, executor; the kvcache index is fed
  beside the steps and is in no request's trace), rooted at Envoy's span;
- Prometheus scrapes every service (router, tokenizer, kvcache, scheduler, executor
  and Envoy's stats), every target up, and the router's request counter counts it.

Run by compose/test/run.sh (which provides Docker, the base image and the staged
build context); not under tests/, so `make test` does not collect it. Everything is
brought down at the end, whatever happened.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = [ROOT / "compose" / "docker-compose.yml",
                 ROOT / "compose" / "test" / "docker-compose.test.yml"]
PROJECT = os.environ.get("LLMESH_COMPOSE_PROJECT", "llmesh-compose-test")
BUILD_TIMEOUT_S = float(os.environ.get("LLMESH_COMPOSE_BUILD_TIMEOUT_S", "1200"))
UP_TIMEOUT_S = float(os.environ.get("LLMESH_COMPOSE_UP_TIMEOUT_S", "300"))

# services with a health check (each SERVING) and the rest that must be running
HEALTHY = ["collector", "tokenizer", "kvcache", "executor", "scheduler", "router", "envoy"]
RUNNING = ["prometheus"]
# every service on a request's path exports spans
TRACED = {"envoy", "router", "tokenizer", "scheduler", "executor"}
# Prometheus jobs (compose/prometheus.yml): every service's /metrics and Envoy's stats
SCRAPED = {"router", "tokenizer", "kvcache", "scheduler", "executor", "envoy"}

PROMPT = "The lighthouse keeper"
MAX_TOKENS = 12


def compose_command() -> list[str]:
    """docker-compose (v1, Debian's) or `docker compose` (v2); LLMESH_COMPOSE overrides."""
    if os.environ.get("LLMESH_COMPOSE"):
        return shlex.split(os.environ["LLMESH_COMPOSE"])
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return ["docker", "compose"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout_s: float, interval_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


class Stack:
    def __init__(self, env: dict, log_dir: Path):
        self.env = env
        self.log_dir = log_dir
        self.base = compose_command() + ["-p", PROJECT] + [
            a for f in COMPOSE_FILES for a in ("-f", str(f))]

    def run(self, *args, timeout: float, check: bool = True, log: str | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
        """A compose command; with `log`, its output goes to that file in log_dir."""
        cmd = self.base + list(args)
        if log:
            path = self.log_dir / log
            with open(path, "ab") as out:
                out.write(f"$ {shlex.join(cmd)}\n".encode())
                out.flush()
                try:
                    proc = subprocess.run(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, timeout=timeout)
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"`{' '.join(args)}` ran past {timeout:.0f}s; "
                                         f"log tail:\n{tail(path)}") from None
            if check and proc.returncode != 0:
                raise AssertionError(f"`{' '.join(args)}` exited with {proc.returncode}; "
                                     f"log tail:\n{tail(path)}")
            return proc
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"`{' '.join(args)}` exited with {proc.returncode}:\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def container(self, service: str) -> str:
        return self.run("ps", "-q", service, timeout=60).stdout.strip()

    def state(self, service: str) -> str:
        """'running healthy', 'running starting', 'exited', ... ('' when not created)."""
        cid = self.container(service)
        if not cid:
            return ""
        out = subprocess.run(
            ["docker", "inspect", "-f",
             "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}", cid],
            capture_output=True, text=True, timeout=30)
        return out.stdout.strip()

    def diagnostics(self) -> str:
        ps = self.run("ps", timeout=60, check=False)
        logs = self.run("logs", "--no-color", "--tail", "40", timeout=120, check=False)
        return f"{ps.stdout}\n{logs.stdout[-12000:]}\n{logs.stderr[-2000:]}"


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    context = os.environ.get("LLMESH_BUILD_CONTEXT", "")
    if not context or not (Path(context) / "compose" / "Dockerfile").is_file():
        raise RuntimeError("LLMESH_BUILD_CONTEXT must name the staged build context; "
                           "run this test through compose/test/run.sh")
    log_dir = Path(os.environ.get("LLMESH_COMPOSE_LOG_DIR") or tmp_path_factory.mktemp("logs"))
    log_dir.mkdir(parents=True, exist_ok=True)
    traces = tmp_path_factory.mktemp("traces")
    traces.chmod(0o777)  # the collector writes here from its container
    ports = {name: free_port() for name in ("GATEWAY", "PROMETHEUS", "JAEGER_UI", "GRAFANA")}
    env = dict(os.environ, LLMESH_BUILD_CONTEXT=context, LLMESH_TEST_TRACES_DIR=str(traces),
               LLMESH_BIND="127.0.0.1", COMPOSE_DOCKER_CLI_BUILD="0", DOCKER_BUILDKIT="0",
               **{f"LLMESH_{k}_PORT": str(v) for k, v in ports.items()})
    s = Stack(env, log_dir)
    s.gateway = f"127.0.0.1:{ports['GATEWAY']}"
    s.prometheus = f"http://127.0.0.1:{ports['PROMETHEUS']}"
    s.traces = traces / "traces.jsonl"
    s.run("down", "-v", "--remove-orphans", "--timeout", "5", timeout=180, check=False,
          log="compose.log")  # whatever an interrupted run left
    try:
        t0 = time.monotonic()
        # every llmesh service has the same build: the tokenizer's makes llmesh:local
        # for all of them (v1: no failed build's intermediate containers left behind)
        force_rm = ["--force-rm"] if s.base[0] == "docker-compose" else []
        s.run("build", *force_rm, "tokenizer", "prometheus", timeout=BUILD_TIMEOUT_S,
              log="build.log")
        print(f"build: {time.monotonic() - t0:.0f}s")
        t0 = time.monotonic()
        # up -d waits for each dependency's health check (depends_on: service_healthy)
        s.run("up", "-d", "--no-build", timeout=UP_TIMEOUT_S, log="compose.log")
        states = {}

        def all_ready():
            states.update({name: s.state(name) for name in HEALTHY + RUNNING})
            dead = {n: st for n, st in states.items() if not st.startswith("running")
                    or st.endswith("unhealthy")}
            if dead and time.monotonic() - t0 > 30:
                raise AssertionError(f"containers not running or unhealthy: {dead}\n"
                                     f"{s.diagnostics()}")
            return all(states[n] == "running healthy" for n in HEALTHY) and \
                all(states[n].startswith("running") for n in RUNNING)
        assert wait_until(all_ready, UP_TIMEOUT_S, 2), f"{states}\n{s.diagnostics()}"
        print(f"up and healthy: {time.monotonic() - t0:.0f}s")
        yield s
    except BaseException:
        print(s.diagnostics())
        raise
    finally:
        s.run("logs", "--no-color", timeout=120, check=False, log="services.log")
        s.run("down", "-v", "--remove-orphans", "--timeout", "10", timeout=180, check=False,
              log="compose.log")


@pytest.fixture(scope="module")
def generation(stack):
    """One streamed, greedy Generate through Envoy: its chunks."""
    request = inference_pb2.GenerateRequest(prompt=PROMPT, sampling=common_pb2.SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    with grpc.insecure_channel(stack.gateway) as channel:
        chunks = list(inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60))
    return chunks


def test_envoy_answers_serving(stack):
    with grpc.insecure_channel(stack.gateway) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_streamed_generation_through_envoy(stack, generation):
    tokens = [t for c in generation for t in c.token_ids]
    assert len(tokens) == MAX_TOKENS
    assert generation[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH, generation[-1]
    assert generation[0].request_id and all(c.request_id == generation[0].request_id
                                            for c in generation)
    assert "".join(c.text for c in generation)
    # the same request in-process (the Engine on the image's model, run in the
    # tokenizer's container): the mesh must give exactly its tokens
    local = stack.run("exec", "-T", "tokenizer", "llmesh", "generate", "--local", "--model",
                      "/models/tiny", "--raw", "--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS),
                      "--temperature", "0", "--ignore-eos", "--json", timeout=180)
    expected = json.loads(local.stdout.strip().splitlines()[-1])
    assert tokens == expected["token_ids"]


def test_http_api_through_envoy(stack):
    with urllib.request.urlopen(f"http://{stack.gateway}/v1/models", timeout=30) as r:
        models = json.load(r)
    assert [m["id"] for m in models["data"]] == ["default"]


def _spans(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def test_trace_exported_from_every_service(stack, generation):
    rid = generation[0].request_id
    found = {}

    def complete():
        spans = _spans(stack.traces)
        ids = {s["trace_id"] for s in spans if s["attributes"].get("llmesh.request_id") == rid}
        if len(ids) != 1:
            return False
        (trace_id,) = ids
        found["spans"] = [s for s in spans if s["trace_id"] == trace_id]
        found["services"] = {s["service"] for s in found["spans"]}
        return TRACED <= found["services"]
    # each process exports every 2 s: wait for all of them
    assert wait_until(complete, 60), (rid, found.get("services"), len(_spans(stack.traces)))
    roots = [s for s in found["spans"] if not s["parent_span_id"]]
    assert [(s["service"], s["name"]) for s in roots] == [("envoy", "ingress")]
    names = {(s["service"], s["name"]) for s in found["spans"]}
    assert {("scheduler", "scheduler.request"), ("executor", "executor.step")} <= names
    # (the prompt never goes into a span)
    assert PROMPT not in stack.traces.read_text()


def _prometheus(stack, path: str, **params) -> dict:
    url = f"{stack.prometheus}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def test_prometheus_scrapes_every_service(stack, generation):
    seen = []

    def all_up():
        try:
            targets = _prometheus(stack, "/api/v1/targets")["activeTargets"]
        except OSError:
            return False
        seen[:] = [(t["labels"]["job"], t["scrapeUrl"], t["health"], t.get("lastError", ""))
                   for t in targets]
        return {job for job, *_ in seen} == SCRAPED and all(h == "up" for _, _, h, _ in seen)
    assert wait_until(all_up, 60), seen

    def counted():
        result = _prometheus(stack, "/api/v1/query",
                             query='sum(llmesh_requests_total{job="router"})')["result"]
        return result and float(result[0]["value"][1]) >= 1
    # the router's counter, as scraped, counts the streamed request
    assert wait_until(counted, 30)
