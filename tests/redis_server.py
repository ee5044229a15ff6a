"""A real redis-server for tests: started on a free loopback port, no persistence,
stopped by its pid (never by name).

    server = start_redis_or_skip()      # skips (or fails with LLMESH_REQUIRE_REDIS=1) without redis-server
    ... server.url ...
    server.stop()
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

REQUIRE_ENV = "LLMESH_REQUIRE_REDIS"


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, proc: subprocess.Popen, port: int, workdir: str):
        self.proc, self.port, self._workdir = proc, port, workdir

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, binary: str | None = None, attempts: int = 3, ready_timeout_s: float = 10.0) -> "RedisServer":
        binary = binary or redis_server_path()
        if not binary:
            raise FileNotFoundError("redis-server is not on PATH")
        last = ""
        for _ in range(attempts):       # a free port can be taken between probing and binding: retry
            port = _free_port()
            workdir = tempfile.mkdtemp(prefix="llmesh-redis-")
            proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", workdir, "--daemonize", "no", "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + ready_timeout_s
            while time.monotonic() < deadline and proc.poll() is None:
                if _ping(port):
                    return cls(proc, port, workdir)
                time.sleep(0.02)
            if proc.poll() is not None and proc.stderr:     # exited: its stderr says why
                last = proc.stderr.read().decode(errors="replace")[-500:]
            else:
                last = f"no PONG on port {port} within {ready_timeout_s} s"
            cls(proc, port, workdir).stop()
        raise RuntimeError(f"redis-server did not start after {attempts} attempts: {last}")

    def stop(self) -> None:
        """Stop this server by its pid: SIGTERM, then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
            except ProcessLookupError:
                pass
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self._workdir, ignore_errors=True)


def start_redis_or_skip() -> RedisServer:
    """Start a redis-server, or skip the calling test when there is none (fail
    instead when LLMESH_REQUIRE_REDIS=1)."""
    import pytest
    if redis_server_path() is None:
        msg = "redis-server is not on PATH (install redis-server to run the Redis limiter tests)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{msg}; {REQUIRE_ENV}=1 requires it")
        pytest.skip(msg)
    return RedisServer.start()
