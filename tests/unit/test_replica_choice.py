"""Warm standby in the router's replica choice: idle while every regular replica
is ready, used the moment one is not, idle again once it is back."""
from llmesh.services.router.core import ReplicaChooser, ReplicaLoad, RoutingPolicy, standby_active


def pick_replica(loads):
    return ReplicaChooser(RoutingPolicy(policy="least_loaded")).pick(loads)


def _loads(regular_ready, standby_ready=True, in_flight=(0, 0, 0)):
    loads = [ReplicaLoad(f"r{i}", ok, n) for i, (ok, n) in enumerate(zip(regular_ready, in_flight))]
    return loads + [ReplicaLoad("standby", standby_ready, 0, is_standby=True)]


def test_standby_idle_while_every_regular_replica_is_ready():
    loads = _loads([True, True], in_flight=(5, 7))
    assert not standby_active(loads)
    assert pick_replica(loads) == "r0"  # the least loaded regular one, though busier


def test_standby_takes_requests_while_a_regular_replica_is_not_ready():
    loads = _loads([False, True], in_flight=(0, 3))
    assert standby_active(loads)
    assert pick_replica(loads) == "standby"  # least loaded among the ready, standby included
    assert pick_replica(_loads([False, False])) == "standby"
    assert pick_replica(_loads([False, False], standby_ready=False)) is None


def test_no_standby_is_plain_least_loaded():
    loads = [ReplicaLoad("a", True, 4), ReplicaLoad("b", True, 2), ReplicaLoad("c", False, 0)]
    assert not standby_active(loads) and pick_replica(loads) == "b"
