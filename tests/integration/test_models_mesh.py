"""Two models behind one gateway (mesh.yaml `models:`): `alpha` (the tiny
checkpoint) and `beta` (the same shape and tokenizer, other weights). Each
request goes to the model it names, over HTTP (the `openai` client through
Envoy) and gRPC, and answers with that model's own greedy tokens (those of an
in-process engine on its directory); an unknown name is a 404 / NOT_FOUND that
lists the served ones; tenants may be limited to some models; metrics are
labelled by model; `llmesh scale --model beta` adds a replica that serves beta."""
import json
import time
import urllib.request

import grpc
import openai
import pytest

from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from mesh_fixture import Mesh, serving, wait_until

PROMPTS = ["The lighthouse keeper", "Once upon a time", "The river"]


@pytest.fixture(scope="module")
def beta_dir(tmp_path_factory):
    from llmesh.mesh.default_model import make_tiny
    return make_tiny(tmp_path_factory.mktemp("beta") / "tiny-beta", seed=1)


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, beta_dir, tmp_path_factory):
    from llmesh.services.router.tenants import hash_key
    run_dir = tmp_path_factory.mktemp("models-mesh")
    keys = run_dir / "keys.yaml"
    keys.write_text(json.dumps({"tenants": {
        "all": {"keys": [hash_key("k-all")]},
        "alpha-only": {"keys": [hash_key("k-alpha")], "models": ["alpha"]}}}))
    # (least loaded: a replica that joins takes requests at once, whatever is cached where)
    m = Mesh(tiny_model_dir, run_dir, model_name="alpha", observability={"tracing": "off"},
             admission={"keys_file": str(keys)}, routing={"policy": "least_loaded"},
             models=[{"name": "beta", "model": str(beta_dir), "replicas": 1,
                      "engine": {"max_num_seqs": 8}}])
    yield from serving(m)


@pytest.fixture(scope="module")
def own_answers(tiny_model_dir, beta_dir):
    """Each model's greedy continuations of PROMPTS, from an in-process engine."""
    from llmesh.services.common.sampling_params import SamplingParams
    from llmesh.services.common.tokenizer import TextTokenizer
    from llmesh.services.engine.engine import Engine, EngineConfig
    out = {}
    for name, model_dir in (("alpha", tiny_model_dir), ("beta", beta_dir)):
        tok = TextTokenizer(model_dir)
        engine = Engine.from_pretrained(model_dir, EngineConfig(num_kv_blocks=64))
        try:
            done = engine.generate([tok.encode(p) for p in PROMPTS],
                                   SamplingParams(max_tokens=12, temperature=0.0))
        finally:
            engine.close()
        out[name] = [c[0].token_ids for c in done]
    return out


def _client(mesh, key="k-all") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{mesh.endpoint}/v1", api_key=key, max_retries=0,
                         timeout=60)


def _grpc(mesh, model: str, prompt: str, key="k-all") -> inference_pb2.GenerateResponse:
    with grpc.insecure_channel(mesh.endpoint) as ch:
        return inference_pb2_grpc.InferenceStub(ch).Complete(
            inference_pb2.GenerateRequest(model=model, prompt=prompt, sampling=common_pb2.SamplingParams(
                max_tokens=12, temperature=0.0)),
            timeout=60, metadata=(("authorization", f"Bearer {key}"),))


def test_both_models_are_listed(mesh):
    assert sorted(m.id for m in _client(mesh).models.list().data) == ["alpha", "beta"]
    with grpc.insecure_channel(mesh.endpoint) as ch:
        listed = inference_pb2_grpc.InferenceStub(ch).ListModels(
            inference_pb2.ListModelsRequest(), timeout=30)
    assert sorted(m.name for m in listed.models) == ["alpha", "beta"]


def test_each_model_answers_with_its_own_tokens(mesh, own_answers):
    # (the two differ, so an answer shows which model computed it)
    assert own_answers["alpha"] != own_answers["beta"]
    client = _client(mesh)
    for i, prompt in enumerate(PROMPTS):
        for model in ("alpha", "beta"):
            out = client.completions.create(model=model, prompt=prompt, max_tokens=12,
                                            temperature=0, logprobs=0)
            assert out.model == model
            ref = _grpc(mesh, model, prompt)
            assert list(ref.token_ids) == own_answers[model][i], (model, prompt)
            assert out.choices[0].text == ref.text
        # no model named: the top-level one
        assert list(_grpc(mesh, "", prompt).token_ids) == own_answers["alpha"][i]


def test_streamed_chat_goes_to_the_named_model(mesh):
    client = _client(mesh)
    texts = {}
    for model in ("alpha", "beta"):
        whole = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Tell me about the sea"}],
            max_tokens=10, temperature=0)
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Tell me about the sea"}],
            max_tokens=10, temperature=0, stream=True)
        chunks = list(stream)
        assert {c.model for c in chunks} == {model}
        texts[model] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert texts[model] == whole.choices[0].message.content
    assert texts["alpha"] != texts["beta"]


def test_an_unknown_model_is_404_naming_the_served_ones(mesh):
    with pytest.raises(openai.NotFoundError) as err:
        _client(mesh).completions.create(model="gamma", prompt="x", max_tokens=2)
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    assert "gamma" in err.value.message and "alpha, beta" in err.value.message
    with pytest.raises(grpc.RpcError) as rpc:
        _grpc(mesh, "gamma", "x")
    assert rpc.value.code() == grpc.StatusCode.NOT_FOUND and "alpha, beta" in rpc.value.details()
    with pytest.raises(openai.NotFoundError):
        _client(mesh).models.retrieve("gamma")


def test_a_tenant_limited_to_one_model(mesh):
    assert _grpc(mesh, "alpha", "The river", key="k-alpha").token_ids
    with pytest.raises(grpc.RpcError) as rpc:
        _grpc(mesh, "beta", "The river", key="k-alpha")
    assert rpc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(openai.PermissionDeniedError):
        _client(mesh, "k-alpha").completions.create(model="beta", prompt="x", max_tokens=2)


def _metrics(port) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_router_metrics_are_labelled_by_model(mesh):
    router = mesh.config["observability"]["metrics_ports"]["router-0"]
    key = 'llmesh_generation_tokens_total{model="%s"}'
    before = _metrics(router)
    served = {"alpha": 0, "beta": 0}
    for model in ("alpha", "beta", "beta"):
        served[model] += len(_grpc(mesh, model, "Once upon a time").token_ids)
    after = _metrics(router)
    for model, tokens in served.items():
        assert after[key % model] - before.get(key % model, 0.0) == tokens


def test_scaling_one_model_leaves_the_other(mesh, own_answers):
    out = mesh.cli("scale", "--model", "beta", "--replicas", "2", timeout=200)
    assert out.returncode == 0, out.stderr
    state = json.loads((mesh.run_dir / "state.json").read_text())
    assert state["models"]["beta"]["replicas"] == 2 and state["models"]["alpha"]["replicas"] == 1
    beta = state["config"]["models"][0]["replica_ports"]
    alpha = state["config"]["replica_ports"]
    assert len(beta) == 2 and len(alpha) == 1
    # replica numbers are the mesh's: the new one takes the next free number
    assert sorted(p["index"] for p in alpha + beta) == [0, 1, 2]
    new = max(beta, key=lambda p: p["index"])
    metrics = state["config"]["observability"]["metrics_ports"][f"scheduler-{new['index']}"]
    steps0 = _metrics(metrics)["llmesh_engine_steps_total"]
    # concurrent requests reach the new one too (once the router has it, and once
    # the old one, which holds the prompts' prefixes, is the prefix bound ahead):
    # rounds of 24, at most 5 within 60 s, each answer checked
    from concurrent.futures import ThreadPoolExecutor

    def new_one_stepped() -> bool:
        return _metrics(metrics)["llmesh_engine_steps_total"] > steps0
    deadline = time.monotonic() + 60
    for _ in range(5):
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda i: _grpc(mesh, "beta", PROMPTS[i % 3]), range(24)))
        assert all(list(o.token_ids) == own_answers["beta"][i % 3] for i, o in enumerate(outs))
        if wait_until(new_one_stepped, 2) or time.monotonic() > deadline:
            break
    assert new_one_stepped()
    out = mesh.cli("scale", "--model", "gamma", "--replicas", "2", timeout=60)
    assert out.returncode == 2 and "gamma" in out.stderr


def test_llmesh_generate_names_the_model(mesh, own_answers):
    out = mesh.cli("generate", "--model", "beta", "--raw", "--prompt", PROMPTS[1],
                   "--max-tokens", "12", "--speculative-tokens", "4", "--json",
                   "--api-key", "k-all")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["token_ids"] == own_answers["beta"][1]
    out = mesh.cli("generate", "--model", "gamma", "--prompt", "hi", "--api-key", "k-all")
    assert out.returncode != 0 and "NOT_FOUND" in out.stderr
