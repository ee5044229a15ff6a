"""Where this process's servers listen."""
from __future__ import annotations

import os


def bind_host() -> str:
    """Where servers listen: loopback, unless LLMESH_BIND_HOST says otherwise (in
    a container, 0.0.0.0: its peers, probes and Prometheus come from outside)."""
    return os.environ.get("LLMESH_BIND_HOST", "127.0.0.1")
