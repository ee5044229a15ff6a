"""A hung scheduler (SIGSTOP) of two replicas, under load: its Connect stream to the
router stays open but goes silent, so nothing but silence can tell it from a slow
one. The router counts a replica silent for `routing.replica_silence_s` as lost:
the requests streaming from it move to the other replica, every request completes
with a fault-free run's tokens, and once the scheduler runs again (SIGCONT) it
reconnects and serves."""
import json
import os
import signal
import threading
import time

import pytest

from chaos.load import (NO_TTFT_BUDGET, InFlight, assert_all_exact, router_migrations,
                        run_load, scheduler_stats)
from integration.mesh_fixture import Mesh, serving, wait_until

SILENCE_S = 2.0
STOP_S = 6.0


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("hung-scheduler"), admission=NO_TTFT_BUDGET,
             replicas=2, observability={"tracing": "off"},
             routing={"policy": "round_robin", "replica_silence_s": SILENCE_S},
             engine={"num_kv_blocks": 512, "probe_interval_s": 0})
    yield from serving(m)


def test_a_silent_scheduler_is_lost_and_its_requests_move(mesh, workload):
    pid = json.loads((mesh.run_dir / "state.json").read_text())["pids"]["scheduler-0"]
    moved = router_migrations(mesh)
    box, in_flight = [], InFlight()
    load = threading.Thread(target=lambda: box.append(run_load(mesh, workload, in_flight=in_flight)))
    load.start()
    hit = in_flight.strike(lambda: os.kill(pid, signal.SIGSTOP), at_least=4)
    try:
        time.sleep(STOP_S if hit else 0)  # (the router gives up on it after SILENCE_S)
    finally:
        os.kill(pid, signal.SIGCONT)
    load.join(120)
    assert not load.is_alive(), "the load hung"
    assert hit > 0, "the load ended before its requests streamed"
    assert router_migrations(mesh) > moved  # requests were streaming from the hung one
    assert_all_exact(box[0], workload[2])
    before = scheduler_stats(mesh, 0).num_admitted
    small = tuple(part[:8] for part in workload)

    def serves_again() -> bool:
        assert_all_exact(run_load(mesh, small), small[2])
        return scheduler_stats(mesh, 0).num_admitted > before
    assert wait_until(serves_again, 60, interval_s=0.5), "replica-0 did not come back"


class Partition:
    """A TCP proxy on loopback to `target_port` that can be partitioned: while it is,
    every connection stays open and nothing crosses either way; healed, what was
    held back is delivered (as TCP does after a partition shorter than its
    retransmission timeout: silence, not a reset, then everything)."""

    def __init__(self, target_port: int):
        import asyncio
        self.target_port = target_port
        self.partitioned = False
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        import asyncio
        asyncio.set_event_loop(self.loop)

        async def pump(reader, writer):
            try:
                while data := await reader.read(65536):
                    while self.partitioned:
                        await asyncio.sleep(0.05)
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()

        async def handle(reader, writer):
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pump(reader, up_w), pump(up_r, writer))

        async def serve():
            self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            self._ready.set()
        self.loop.run_until_complete(serve())
        self.loop.run_forever()

    def close(self) -> None:
        async def shut():
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
        import asyncio
        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def test_a_partition_between_router_and_scheduler_moves_the_requests(mesh, workload):
    """replica-0 reached through a proxy (the routers' replica set names it); the proxy
    partitions under load: the stream goes silent, the router counts replica-0 lost,
    its requests move to replica-1 and complete; healed, replica-0 serves again."""
    from llmesh.services.router.replica_set import read_replica_set, write_replica_set
    path = mesh.run_dir / "replicas.json"
    entries = read_replica_set(path)
    port = mesh.config["replica_ports"][0]["scheduler"]
    proxy = Partition(port)
    try:
        write_replica_set(path, [e if e.name != "replica-0" else
                                 type(e)(e.name, f"127.0.0.1:{proxy.port}", e.standby, e.draining)
                                 for e in entries])
        small = tuple(part[:8] for part in workload)
        before = scheduler_stats(mesh, 0).num_admitted

        def through_proxy() -> bool:  # the router uses the proxied address
            assert_all_exact(run_load(mesh, small), small[2])
            return scheduler_stats(mesh, 0).num_admitted > before
        assert wait_until(through_proxy, 60, interval_s=0.5)
        moved = router_migrations(mesh)
        box, in_flight = [], InFlight()
        load = threading.Thread(
            target=lambda: box.append(run_load(mesh, workload, in_flight=in_flight)))
        load.start()
        hit = in_flight.strike(lambda: setattr(proxy, "partitioned", True), at_least=4)
        time.sleep(STOP_S if hit else 0)
        proxy.partitioned = False
        load.join(120)
        assert not load.is_alive(), "the load hung"
        assert hit > 0
        assert router_migrations(mesh) > moved  # requests were streaming through the proxy
        assert_all_exact(box[0], workload[2])
        before = scheduler_stats(mesh, 0).num_admitted
        assert wait_until(through_proxy, 60, interval_s=0.5), "replica-0 did not come back"
    finally:
        write_replica_set(path, entries)
        proxy.close()
