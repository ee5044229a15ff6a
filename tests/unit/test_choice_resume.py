"""Moving an n > 1 request: its unfinished choices continue elsewhere, each as its
own sequence after the tokens its client has, with the tokens an unmoved run gives."""
import pytest

from llmesh.v1 import engine_pb2, scheduler_pb2
from llmesh.services.common.errors import InvalidRequestError
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.engine.engine import Engine, EngineConfig
from llmesh.services.router.dispatch import resumed

PROMPT = [0] + list(range(40, 75))  # two full blocks and a bit (the prefix cache shares them)
PARAMS = SamplingParams(n=3, max_tokens=24, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)


def _run(engine: Engine) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.index, []).extend(o.new_token_ids)
    return out


@pytest.fixture(scope="module")
def whole(tiny_model):
    return [c.token_ids for c in Engine(tiny_model, EngineConfig()).generate([PROMPT], PARAMS)[0]]


@pytest.mark.parametrize("cut", [{0: 1, 1: 1, 2: 1}, {0: 3, 2: 11}, {1: 23}])
def test_resumed_choices_continue_with_the_unmoved_tokens(tiny_model, whole, cut):
    """Choices at different lengths (some finished: not listed) resume exactly, and
    only the listed ones run."""
    engine = Engine(tiny_model, EngineConfig())
    engine.loop.add("moved", PROMPT, PARAMS, "engine",
                    resume={i: whole[i][:k] for i, k in cut.items()})
    rest = _run(engine)
    assert rest == {i: whole[i][k:] for i, k in cut.items()}
    assert not engine.scheduler.has_request("moved")  # (every listed choice finished)


@pytest.mark.parametrize("resume", [{0: [], 1: [5]},  # a choice before its fork
                                    {3: [5]},  # no such choice
                                    {1: [5] * 24},  # at its max_tokens
                                    {1: [10 ** 6]}])  # not in the vocabulary
def test_a_resume_that_cannot_be_the_requests_is_refused(tiny_model, resume):
    engine = Engine(tiny_model, EngineConfig())
    with pytest.raises(InvalidRequestError):
        engine.loop.add("bad", PROMPT, PARAMS, "engine", resume=resume)
    assert not engine.has_unfinished()
    with pytest.raises(InvalidRequestError):  # n = 1 resumes choice 0 only
        engine.loop.add("bad1", PROMPT, PARAMS.replace(n=1), "engine", resume={1: [5]})


def _add(n: int) -> scheduler_pb2.AddRequest:
    return scheduler_pb2.AddRequest(request_id="r", prompt_token_ids=PROMPT,
                                    sampling=engine_pb2.SamplingConfig(n=n, max_tokens=8),
                                    arrival_unix_s=123.0)


def test_the_router_resubmits_what_each_choice_still_needs():
    one = resumed(_add(1), {0: [4, 5]})
    assert list(one.resume_token_ids) == [4, 5] and not one.resume_choices
    assert one.arrival_unix_s == 0.0  # (not held to the TTFT budget again)
    fresh = resumed(_add(3), {0: [], 1: [], 2: []})  # nothing streamed: whole again
    assert not fresh.resume_choices and not fresh.resume_token_ids
    moved = resumed(_add(3), {0: [7], 2: [8, 9]})  # choice 1 finished
    assert [(c.index, list(c.token_ids)) for c in moved.resume_choices] == [(0, [7]), (2, [8, 9])]
    assert resumed(_add(3), {0: [7], 1: []}) is None  # a fork seen in part: never sent
