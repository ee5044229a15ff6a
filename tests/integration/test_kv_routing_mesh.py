"""KV-aware routing in a real mesh of two replicas: a prompt whose prefix one
replica holds (per the kvcache index, fed by the schedulers' block events) goes
there, though by load alone it would go to the other."""
import threading

import grpc
import pytest

from integration.mesh_fixture import Mesh, serving, wait_until
from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc, kvcache_pb2, kvcache_pb2_grpc

PREFIX = [0] + [(37 * k) % 2900 + 5 for k in range(63)]  # 4 blocks of 16


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("kvroute"), replicas=2,
             observability={"tracing": "off"}, engine={"num_kv_blocks": 512})
    yield from serving(m)


def _request(tokens, max_tokens=4):
    return inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=tokens),
                                         sampling=common_pb2.SamplingParams(
                                             max_tokens=max_tokens, ignore_eos=True))


def _holders(mesh, tokens) -> dict:
    with grpc.insecure_channel(f"127.0.0.1:{mesh.config['kvcache_port']}") as ch:
        resp = kvcache_pb2_grpc.KVCacheStub(ch).Match(kvcache_pb2.MatchRequest(token_ids=tokens),
                                                      timeout=5)
    return {r.replica: r.num_blocks for r in resp.replicas if r.num_blocks}


def test_a_cached_prefix_pulls_its_requests_to_the_replica_holding_it(mesh):
    with grpc.insecure_channel(mesh.endpoint) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        # a long request keeps replica-0 busy, so the prefix's first request goes to
        # replica-1 (the least loaded); by load alone, later ones would go to replica-0
        started = threading.Event()

        def long_request():
            for chunk in stub.Generate(_request([0, 9, 9, 9], max_tokens=400), timeout=120):
                started.set()
        busy = threading.Thread(target=long_request)
        busy.start()
        assert started.wait(30)
        stub.Complete(_request(PREFIX + [11]), timeout=30)
        assert wait_until(lambda: _holders(mesh, PREFIX) == {"replica-1": 4}, 10), \
            _holders(mesh, PREFIX)
        busy.join(120)
        cached = [stub.Complete(_request(PREFIX + [100 + i, 7]), timeout=30).usage
                  .cached_prompt_tokens for i in range(8)]
    assert cached == [64] * 8  # every one hit the prefix: all went to replica-1
