"""A serving process's limit on open files, raised to what the system allows.

Many Linux systems start processes with a soft limit of 1,024 open files (the
hard limit is far higher). A gateway under a flood holds a connection per HTTP
request in flight to a router (HTTP/1.1) and up to `envoy.max_connections`
(1,024) of them: with the soft limit at 1,024, a 900 requests/s flood made the
router's accept() fail with EMFILE over a million times in two minutes, and its
HTTP server stopped answering
(`benchmarks/results/overload-native/open-files-1024-before.log`). The
supervisor raises its own soft limit to the hard one before it starts the mesh's
processes, which inherit it, and every service does the same when it starts on
its own (compose, Kubernetes).
"""
from __future__ import annotations

import logging
import resource

log = logging.getLogger("llmesh")
# what to take when the hard limit is unlimited (the kernel's default nr_open)
UNLIMITED_TARGET = 1 << 20


def raise_open_files() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError) as e:  # (a sandbox may refuse: keep what there is)
            log.warning("open files stay limited to %d: %s", soft, e)
    return soft
