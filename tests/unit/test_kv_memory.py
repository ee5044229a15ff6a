"""KV sized from the machine's memory on CPU: what is available (cgroup limits
included), the share, the cap at what the scheduler can fill, and the mesh's
split among its executor processes."""
import pytest

from llmesh.mesh.config import ConfigError, parse_config
from llmesh.mesh.ports import resolve_ports
from llmesh.mesh.supervisor import build_specs
from llmesh.services.engine.engine import Engine, EngineConfig
from llmesh.services.executor.kv_memory import available_memory_bytes, kv_cap_blocks, size_kv_cache

GIB = 2**30


def _machine(tmp_path, mem_available_kib: int, cgroup: dict[str, str]):
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemFree: 1 kB\n"
                                  f"MemAvailable: {mem_available_kib} kB\n")
    for name, text in cgroup.items():
        (cg / name).parent.mkdir(parents=True, exist_ok=True)
        (cg / name).write_text(text + "\n")
    return proc, cg


def test_available_memory_is_the_smaller_of_the_kernel_and_the_cgroup(tmp_path):
    proc, cg = _machine(tmp_path / "a", 8 * 1024 * 1024, {})
    assert available_memory_bytes(proc, cg) == 8 * GIB  # no cgroup files: the kernel's figure
    proc, cg = _machine(tmp_path / "b", 8 * 1024 * 1024,
                        {"memory.max": str(3 * GIB), "memory.current": str(1 * GIB)})
    assert available_memory_bytes(proc, cg) == 2 * GIB  # a container's limit binds
    proc, cg = _machine(tmp_path / "c", 8 * 1024 * 1024,
                        {"memory.max": "max", "memory.current": str(GIB)})
    assert available_memory_bytes(proc, cg) == 8 * GIB  # "max": no limit
    proc, cg = _machine(tmp_path / "d", 8 * 1024 * 1024,
                        {"memory/memory.limit_in_bytes": str(5 * GIB),
                         "memory/memory.usage_in_bytes": str(4 * GIB)})
    assert available_memory_bytes(proc, cg) == GIB  # cgroup v1


def test_share_of_available_less_activations_capped_at_what_can_be_used():
    per_block = 2**20
    s = size_kv_cache(per_block, cap_blocks=10_000, share=0.5, activation_bytes=GIB,
                      available=5 * GIB)
    assert s.num_blocks == 2048  # half of (5 - 1) GiB in 1 MiB blocks
    assert size_kv_cache(per_block, 300, 0.5, 0, available=5 * GIB).num_blocks == 300
    assert size_kv_cache(per_block, 300, 0.5, 0, available=0).num_blocks == 1
    assert "2048 blocks" in s.describe(per_block)
    assert kv_cap_blocks(max_num_seqs=4, max_model_len=100, block_size=16) == 4 * 7


def test_engine_default_sizes_its_kv_from_memory(tiny_model):
    """No num_kv_blocks or kv_cache_bytes: this machine has far more memory than
    the tiny model's slots can fill, so the cap decides."""
    engine = Engine(tiny_model, EngineConfig(max_num_seqs=4, max_model_len=256))
    assert engine.kv.pool.num_blocks == kv_cap_blocks(4, 256, 16) == 64
    assert engine.runner.num_blocks == 64
    engine.close()
    explicit = Engine(tiny_model, EngineConfig(num_kv_blocks=40, max_num_seqs=4))
    assert explicit.kv.pool.num_blocks == 40
    explicit.close()


def test_mesh_splits_the_share_among_its_executor_processes(tmp_path):
    cfg = resolve_ports(parse_config({"replicas": 2, "tensor_parallel": 2,
                                      "engine": {"kv_memory_share": 0.4, "max_num_seqs": 8},
                                      "envoy": {"port": 0, "admin_port": 0}}))
    specs = build_specs(cfg, "/models/m", tmp_path)
    execs = [s for s in specs if s.name.startswith("executor-")]
    assert len(execs) == 4
    for spec in execs:
        args = spec.argv
        assert args[args.index("--num-kv-blocks") + 1] == "0"
        assert float(args[args.index("--kv-memory-share") + 1]) == pytest.approx(0.1)
        assert args[args.index("--max-num-seqs") + 1] == "8"
    sched = next(s for s in specs if s.name == "scheduler-0").argv
    assert sched[sched.index("--num-kv-blocks") + 1] == "0"  # it shrinks to the executors'
    fixed = resolve_ports(parse_config({"engine": {"num_kv_blocks": 300},
                                        "envoy": {"port": 0, "admin_port": 0}}))
    spec = next(s for s in build_specs(fixed, "/m", tmp_path) if s.name == "executor-0-0")
    assert "--kv-memory-share" not in spec.argv and "300" in spec.argv


@pytest.mark.parametrize("engine, message", [
    ({"kv_memory_share": 0.99}, "kv_memory_share"),
    ({"num_kv_blocks": -1}, "num_kv_blocks"),
    ({"device": "cuda"}, "set it for device"),
    ({"dtype": "int4"}, "engine.dtype"),
])
def test_bad_kv_and_dtype_settings_are_config_errors(engine, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"engine": engine})
