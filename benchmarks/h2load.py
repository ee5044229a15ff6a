"""An open-loop HTTP flood from h2load, nghttp2's load generator (C, one thread;
Debian's `nghttp2-client`), for benchmarks whose Python client would cost the box
more than the server does.

On a 2-core machine a Python asyncio client sending hundreds of requests a
second takes most of a core, and how long a refusal takes to come back is then
mostly that client's own queueing. h2load sends the same work over HTTP/2
(OpenAI completions through the gateway) for a small share of a core, and writes
each request's HTTP status and time to the end of its response to a log file,
read back here. It sends one body for every request: the benchmark turns the
mesh's prefix caching off, so that no request reuses another's KV.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

PER_CLIENT_RPS = 25.0  # each h2load client (one HTTP/2 connection) sends at most this


def binary() -> str | None:
    return shutil.which("h2load")


def command(url: str, body_path: Path, log_path: Path, rate: float, duration_s: float,
            headers: dict[str, str]) -> list[str]:
    """h2load's command line: `rate` requests a second in all (over connections of
    at most PER_CLIENT_RPS each), int(rate * duration_s) of them, each connection
    with room for every request it could have in flight (open loop)."""
    clients = max(1, math.ceil(rate / PER_CLIENT_RPS))
    count = max(clients, int(rate * duration_s))
    cmd = [binary() or "h2load", "-c", str(clients), "--rps", f"{rate / clients:g}",
           "-n", str(count), "-m", "1024", "-d", str(body_path), "--log-file", str(log_path),
           "-N", "300s"]
    for name, value in {"content-type": "application/json", **headers}.items():
        cmd += ["-H", f"{name}: {value}"]
    return cmd + [url]


def start(url: str, body: dict, rate: float, duration_s: float, headers: dict[str, str],
          work_dir: Path) -> tuple[subprocess.Popen, Path]:
    """h2load started (the flood runs while the caller does its own work); its log's path."""
    body_path, log_path = work_dir / "h2load-body.json", work_dir / "h2load.log"
    body_path.write_text(json.dumps(body))
    log_path.unlink(missing_ok=True)  # (h2load appends to a log that is there)
    cmd = command(url, body_path, log_path, rate, duration_s, headers)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, log_path


def finish(proc: subprocess.Popen, log_path: Path, timeout_s: float) -> tuple[list[dict], str]:
    """Wait for h2load (killed past `timeout_s`); each logged request as {start (s since
    the first), status (HTTP code; -1: no response), ms (to the end of its response)},
    in the order sent, and h2load's own summary."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        out += f"\n(h2load killed after {timeout_s:g} s)"
    return parse_log(log_path.read_text() if log_path.exists() else ""), out


def parse_log(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
    if not rows:
        return []
    t0 = min(r[0] for r in rows)
    return [{"start": (us - t0) / 1e6, "status": status, "ms": dur / 1e3}
            for us, status, dur in sorted(rows)]
