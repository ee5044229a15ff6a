"""The CPU decode kernel where users get it: a bfloat16 mesh's executor process
runs a single stream's decode steps through it, and the stream is token for
token the in-process engine's on the same model (both run the kernel; its rows
do not depend on the thread count or the batch)."""
import grpc
import pytest

from llmesh.kernels import cpu_decode
from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from mesh_fixture import Mesh, serving

pytestmark = pytest.mark.skipif(cpu_decode.unavailable() is not None,
                                reason=f"CPU decode kernel: {cpu_decode.unavailable()}")


@pytest.fixture(scope="module")
def bench_model_dir(tmp_path_factory):
    from llmesh.mesh.default_model import make_tiny
    return make_tiny(tmp_path_factory.mktemp("models") / "bench", preset="bench")


@pytest.fixture(scope="module")
def mesh(bench_model_dir, tmp_path_factory):
    m = Mesh(bench_model_dir, tmp_path_factory.mktemp("bf16"), engine={"dtype": "bfloat16"},
             observability={"tracing": "off"})
    yield from serving(m)


def test_a_bfloat16_single_stream_runs_the_kernel_and_matches_the_engine(mesh, bench_model_dir):
    from llmesh.services.common.sampling_params import SamplingParams
    from llmesh.services.engine.engine import Engine, EngineConfig
    from llmesh.services.executor.weights import load_model
    log = (mesh.run_dir / "logs" / "executor-0-0.log").read_text()
    assert "decode steps of up to 8 sequences: one CPU kernel call" in log, log[-2000:]
    prompts = [[1] + list(range(7, 60)), [1] + list(range(300, 420, 3))]
    with grpc.insecure_channel(mesh.endpoint) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        streamed = []
        for prompt in prompts:  # one at a time: every decode step has one row
            req = inference_pb2.GenerateRequest(
                token_ids=inference_pb2.TokenIds(ids=prompt),
                sampling=common_pb2.SamplingParams(max_tokens=48, temperature=0.0,
                                                   ignore_eos=True))
            streamed.append([t for c in stub.Generate(req, timeout=120) for t in c.token_ids])
    model = load_model(bench_model_dir, "bfloat16")
    engine = Engine(model, EngineConfig())
    try:
        assert engine.runner.cpu_decode is not None
        for prompt, tokens in zip(prompts, streamed):
            expect = engine.generate([prompt], SamplingParams(max_tokens=48, ignore_eos=True))
            assert tokens == expect[0][0].token_ids
        assert engine.runner.cpu_decode.num_steps >= 2 * 47
    finally:
        engine.close()
