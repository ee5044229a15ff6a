"""Dead letters in Redis: a request dropped by its deadline is kept (with its inputs,
or without them for a tenant that forbids logging them), listed, and replayed."""
import json
import subprocess
import sys

import grpc
import pytest

from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from mesh_fixture import ROOT, Mesh, serving, wait_until


@pytest.fixture(scope="module")
def redis():
    from redis_server import start_redis_or_skip
    server = start_redis_or_skip()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory, redis):
    from llmesh.services.router.tenants import hash_key
    run_dir = tmp_path_factory.mktemp("deadletters")
    keys = run_dir / "keys.yaml"
    keys.write_text(json.dumps({"tenants": {
        "open": {"keys": [hash_key("k-open")]},
        "private": {"keys": [hash_key("k-private")], "log_inputs": False}}}))
    m = Mesh(tiny_model_dir, run_dir, observability={"tracing": "off"},
             admission={"keys_file": str(keys), "state": "redis", "redis_url": redis.url})
    yield from serving(m)


def _cli(mesh, *args):
    return subprocess.run([sys.executable, "-m", "llmesh.mesh.cli", "deadletters", *args, "--config",
                           str(mesh.config_path)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def _expire(mesh, key: str, prompt: list[int], structured=None):
    """A deadline of 1 ms: it passes before the request can start (refused with
    DEADLINE_EXCEEDED) or, rarely, after its first step (Complete answers the
    partial output marked incomplete); a dead letter either way."""
    req = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=prompt),
                                        sampling=common_pb2.SamplingParams(
                                            max_tokens=6, structured=structured),
                                        timeout_ms=1)
    with grpc.insecure_channel(mesh.endpoint) as ch:
        try:
            out = inference_pb2_grpc.InferenceStub(ch).Complete(
                req, timeout=30, metadata=(("authorization", f"Bearer {key}"),))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            assert out.incomplete and out.incomplete_reason == "deadline exceeded"


def test_expired_requests_are_kept_listed_and_replayed(mesh):
    _expire(mesh, "k-open", [0, 11, 12, 13], common_pb2.StructuredOutput(regex="(ab|cd)"))
    _expire(mesh, "k-private", [0, 21, 22, 23])

    def listed():
        out = _cli(mesh, "list", "--json")
        return json.loads(out.stdout) if out.returncode == 0 else []
    assert wait_until(lambda: len(listed()) == 2, 10), _cli(mesh, "list").stderr
    by_tenant = {e["tenant"]: e for e in listed()}
    assert by_tenant["open"]["reason"] == "deadline exceeded"
    assert json.loads(by_tenant["open"]["prompt_token_ids"]) == [0, 11, 12, 13]
    assert json.loads(by_tenant["open"]["sampling"])["grammar"] == {"kind": "regex",
                                                                   "source": "(ab|cd)"}
    assert "prompt_token_ids" not in by_tenant["private"]  # its policy forbids keeping inputs
    assert by_tenant["private"]["num_prompt_tokens"] == "4"
    assert [e["tenant"] for e in json.loads(_cli(mesh, "list", "--json", "--tenant",
                                                  "private").stdout)] == ["private"]
    replay = _cli(mesh, "replay", "--json", "--tenant", "open", "--api-key", "k-open")
    assert replay.returncode == 0, replay.stderr
    assert [json.loads(line) for line in replay.stdout.splitlines()] == [
        {"id": by_tenant["open"]["id"], "request_id": by_tenant["open"]["request_id"], "status": "OK"}]
    replay = _cli(mesh, "replay", "--json", "--tenant", "private", "--api-key", "k-private")
    assert [json.loads(line)["status"] for line in replay.stdout.splitlines()] == ["SKIPPED"]
    assert [e["tenant"] for e in listed()] == ["private"]  # replayed ones leave the stream
