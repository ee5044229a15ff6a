"""The replica's lifecycle: one object, transitions as events, health told on
each change (services/scheduler/replica_state.py)."""
import asyncio

from llmesh.services.scheduler.replica_state import ReplicaState, State


def _run(coro):
    return asyncio.run(coro)


def test_health_follows_the_state_and_is_told_on_each_change():
    async def go():
        told = []

        async def on_change(state):
            told.append(state)
        s = ReplicaState(on_change=on_change)
        assert s.state is State.STARTING and s.takes_requests and not s.is_serving
        await s.executors_up()
        await s.executors_up()  # (no change: nobody is told twice)
        assert s.is_serving and s.can_probe
        await s.probe_failed()
        assert s.state is State.EJECTED and s.takes_requests and not s.is_serving
        await s.executors_down()
        assert s.state is State.STARTING and not s.can_probe
        await s.executors_up()  # the probe's verdict outlives the executors
        assert s.state is State.EJECTED and s.is_ejected
        await s.probe_passed()
        assert s.is_serving and not s.is_ejected
        return told
    assert _run(go()) == [State.SERVING, State.EJECTED, State.STARTING, State.EJECTED,
                          State.SERVING]


def test_a_restart_refuses_requests_until_the_executors_are_back():
    async def go():
        s = ReplicaState(State.SERVING)
        await s.restart("leak")
        assert s.state is State.RESTARTING and not s.takes_requests and s.is_draining
        await s.executors_down()  # the ranks exit: still refusing
        assert s.state is State.RESTARTING
        back = asyncio.ensure_future(s.wait_for(State.SERVING, timeout_s=5))
        await asyncio.sleep(0.01)
        assert not back.done()
        await s.executors_up()
        assert await back and s.takes_requests
        assert not await s.wait_for(State.STOPPED, timeout_s=0.05)
    _run(go())


def test_a_drain_to_stop_is_never_undone_by_the_executors():
    async def go():
        s = ReplicaState(State.SERVING)
        await s.drain("SIGTERM")
        await s.executors_down()
        await s.executors_up()  # (a reconnect during the drain)
        await s.probe_passed()
        assert s.state is State.DRAINING and not s.takes_requests and not s.can_probe
        await s.restart("leak")  # (a restart cannot start while stopping)
        assert s.state is State.DRAINING
        await s.stopped()
        await s.drain("again")
        assert s.state is State.STOPPED
        return [state for state, _ in s.history]
    assert _run(go()) == [State.SERVING, State.DRAINING, State.STOPPED]


def test_the_engine_loop_refuses_new_requests_while_its_replica_drains(tiny_model_dir):
    import pytest

    from llmesh.services.common.errors import DrainingError
    from llmesh.services.common.sampling_params import SamplingParams
    from llmesh.services.engine.engine import Engine, EngineConfig
    from llmesh.services.executor.model_config import load_model_config
    from llmesh.services.executor.sleep_model import SleepModel
    engine = Engine(SleepModel(load_model_config(tiny_model_dir), 0.0),
                    EngineConfig(num_kv_blocks=16))
    params = SamplingParams(max_tokens=2, seed=1)
    engine.loop.add("before", [1, 2, 3], params, "t")
    _run(engine.loop.state.restart("test"))
    with pytest.raises(DrainingError):
        engine.loop.add("during", [1, 2, 3], params, "t")
    _run(engine.loop.state.executors_up())
    engine.loop.add("after", [1, 2, 3], params, "t")
    engine.close()
