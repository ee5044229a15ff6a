"""What a report says about where it ran: machine, versions, memory bandwidth,
model bytes, and the roofline of a decode step (bytes it must move / bandwidth)."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmesh.services.executor.weights import DTYPES


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "num_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_bytes": mem, "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def versions() -> dict:
    import tokenizers
    out = {"python": sys.version.split()[0], "torch": torch.__version__,
           "tokenizers": tokenizers.__version__}
    for name in ("transformers", "grpc", "matplotlib"):
        try:
            out[name if name != "grpc" else "grpcio"] = __import__(name).__version__
        except ImportError:
            pass
    try:
        git = ["git", "-C", str(Path(__file__).parent)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        if commit and subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                     capture_output=True, text=True, timeout=10).stdout.strip():
            commit += "+dirty"  # (tracked files changed since that commit)
        out["llmesh_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def measure_memory_bandwidth(num_bytes: int = 256 * 2**20, reps: int = 5,
                             device: str = "cpu") -> dict:
    """Bytes/s of a large tensor copy (read + write counted), median of `reps` timed copies."""
    dev = torch.device(device)
    n = num_bytes // 4
    src = torch.ones(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page once
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    del src, dst
    return {"method": "torch copy_ of a float32 buffer; bytes read + written / median time",
            "buffer_bytes": n * 4, "reps": reps, "device": str(dev),
            "bytes_per_s": 2 * n * 4 / median, "median_copy_s": median}


def model_bytes(model_dir, dtype: str = "float32") -> dict:
    """Parameters and their bytes at the serving dtype; `decode_bytes` leaves out an
    untied input embedding (a decode step reads only a few of its rows)."""
    from safetensors import safe_open
    elem = torch.tensor([], dtype=DTYPES.get(dtype, torch.float32)).element_size()
    counts: dict[str, int] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                counts[name] = n
    total = sum(counts.values())
    embed = sum(n for k, n in counts.items() if k.endswith("embed_tokens.weight"))
    untied = any(k.endswith("lm_head.weight") for k in counts)
    decode_params = total - (embed if untied else 0)
    return {"num_params": total, "dtype": dtype, "bytes": total * elem,
            "decode_bytes": decode_params * elem}


def kv_bytes_per_token(model_config, dtype: str = "float32") -> int:
    elem = torch.tensor([], dtype=DTYPES.get(dtype, torch.float32)).element_size()
    mc = model_config
    return 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * elem


def roofline(weight_bytes: int, kv_bytes_per_step: float | None, bandwidth_bytes_per_s: float,
             measured_step_s: float | None) -> dict:
    """How far a measured step is from the time its bytes take at the measured bandwidth."""
    moved = weight_bytes + (kv_bytes_per_step or 0.0)
    bound_s = moved / bandwidth_bytes_per_s
    out = {"weight_bytes": weight_bytes, "kv_bytes_per_step": kv_bytes_per_step,
           "bytes_per_step": moved, "bandwidth_bytes_per_s": bandwidth_bytes_per_s,
           "bound_step_ms": bound_s * 1000}
    if measured_step_s:
        out["measured_step_ms"] = measured_step_s * 1000
        out["fraction_of_bound"] = bound_s / measured_step_s  # 1.0 = at the memory limit
    return out
