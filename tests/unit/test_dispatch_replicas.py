"""A replica that moves to another address under its name: the old connection is
reaped once nothing of it is in flight, and that must not touch the new one's."""
import asyncio

from llmesh.services.router.dispatch import Dispatcher
from llmesh.services.router.replica_set import ReplicaEntry


def test_reaping_the_old_address_leaves_the_new_connection_running():
    async def main():
        d = Dispatcher([])
        d.start()
        d.set_replicas([ReplicaEntry("replica-0", "127.0.0.1:1")])
        old = d.replicas[0]
        old.in_flight.add("r1")  # (still streaming when it leaves)
        d.set_replicas([ReplicaEntry("replica-0", "127.0.0.1:2")])
        new = next(r for r in d.replicas if r.address == "127.0.0.1:2")
        old_tasks, new_tasks = list(d._tasks[old]), list(d._tasks[new])
        old.in_flight.clear()
        d.reap()
        await asyncio.sleep(0)
        assert d.replicas == [new]
        assert all(t.cancelled() or t.cancelling() for t in old_tasks)  # the old one stops
        assert not any(t.cancelled() or t.cancelling() for t in new_tasks)  # the new one runs
        for t in new_tasks:
            t.cancel()
        await asyncio.gather(*new_tasks, return_exceptions=True)
        await asyncio.gather(*(r.channel.close() for r in (old, new)), return_exceptions=True)
    asyncio.run(main())
