"""A mesh on the CPU runtime's defaults and options as mesh.yaml sets them: KV
sized from memory (num_kv_blocks: 0) and int8 weights. Concurrent streams
through Envoy give the in-process int8 engine's tokens exactly (per-token
activation scales: batching does not change a token), and `llmesh status`
shows the KV the executor sized."""
import json
import random
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from mesh_fixture import Mesh, serving
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.engine.engine import Engine, EngineConfig
from llmesh.services.executor.kv_memory import kv_cap_blocks
from llmesh.services.executor.weights import load_model

MAX_SEQS, MAX_LEN = 8, 512


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("cpu-runtime"),
             engine={"num_kv_blocks": 0, "dtype": "int8", "max_num_seqs": MAX_SEQS,
                     "max_model_len": MAX_LEN}, observability={"tracing": "off"})
    yield from serving(m)


def test_int8_streams_match_the_int8_engine(mesh, stub, tiny_model_dir):
    rng = random.Random(9)
    prompts = [[0] + rng.choices(range(5, 3000), k=rng.randint(2, 120)) for _ in range(12)]
    lengths = [rng.randint(4, 30) for _ in prompts]

    def call(i):
        req = inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=prompts[i]),
            sampling=common_pb2.SamplingParams(max_tokens=lengths[i], temperature=0.0,
                                               ignore_eos=True))
        return [t for c in stub.Generate(req, timeout=120) for t in c.token_ids]

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(call, range(12)))
    engine = Engine(load_model(tiny_model_dir, "int8"), EngineConfig(num_kv_blocks=512))
    expect = engine.generate(prompts, [SamplingParams(max_tokens=n, ignore_eos=True)
                                       for n in lengths])
    engine.close()
    assert got == [e[0].token_ids for e in expect]


def test_status_shows_the_kv_the_executor_sized(mesh):
    proc = mesh.cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    replica = json.loads(proc.stdout)["replicas"][0]
    # this machine's memory holds more than 8 sequences of 512 tokens: the cap decides
    assert replica["kv_blocks"] == kv_cap_blocks(MAX_SEQS, MAX_LEN, 16) == 256
    log = (mesh.run_dir / "logs" / "executor-0-0.log").read_text()
    assert "KV cache: 256 blocks" in log and "available after the weights" in log


@pytest.fixture(scope="module")
def small_kv_mesh(tiny_model_dir, tmp_path_factory):
    """A share so small that the executor's KV, not the cap, sets the limit."""
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("small-kv"),
             engine={"num_kv_blocks": 0, "kv_memory_share": 1e-6, "max_model_len": MAX_LEN},
             observability={"tracing": "off"})
    yield from serving(m)


def test_the_routers_know_the_kv_the_executor_sized(small_kv_mesh):
    """max_tokens 0 (the rest of the room) is computed from the blocks the executor
    sized: the scheduler serves (and the routers start) only once it has shrunk to them."""
    proc = small_kv_mesh.cli("status", "--json")
    blocks = json.loads(proc.stdout)["replicas"][0]["kv_blocks"]
    assert 1 <= blocks < MAX_LEN // 16  # the memory share binds, not max_model_len
    req = inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=[0, 5, 6]),
        sampling=common_pb2.SamplingParams(max_tokens=0, temperature=0.0, ignore_eos=True))
    with grpc.insecure_channel(small_kv_mesh.endpoint) as ch:
        out = inference_pb2_grpc.InferenceStub(ch).Complete(req, timeout=60)
    assert out.usage.completion_tokens == blocks * 16 - 3
