"""mesh.yaml parsing: defaults, tensor-parallel ports, and clear errors."""
import shutil

import pytest

from llmesh.mesh.config import ConfigError, parse_config
from llmesh.mesh.ports import resolve_ports
from llmesh.mesh.supervisor import build_specs


def test_tensor_parallel_gives_each_replica_a_rank_port_each_and_a_rendezvous_port(tmp_path):
    cfg = resolve_ports(parse_config({"tensor_parallel": 2, "replicas": 2,
                                      "envoy": {"port": 0, "admin_port": 0}}))
    ports = set()
    for r in cfg.replica_ports:
        assert len(r.executors) == 2 and r.dist_port
        ports |= {r.scheduler, r.dist_port, *r.executors}
    assert len(ports) == 2 * 4 and cfg.kvcache_port not in ports  # all distinct
    specs = {s.name: s for s in build_specs(cfg, "/models/m", tmp_path)}
    rank1 = specs["executor-1-1"]
    assert rank1.group == specs["executor-1-0"].group == "executors-1"
    assert rank1.group != specs["executor-0-0"].group
    argv = " ".join(rank1.argv)
    assert "--rank 1 --world-size 2" in argv
    assert f"--dist-addr 127.0.0.1:{cfg.replica_ports[1].dist_port}" in argv
    sched = " ".join(specs["scheduler-1"].argv)
    assert ",".join(f"127.0.0.1:{p}" for p in cfg.replica_ports[1].executors) in sched


def test_single_rank_has_no_group_and_no_dist_args(tmp_path):
    cfg = resolve_ports(parse_config({"envoy": {"port": 0, "admin_port": 0}}))
    spec = next(s for s in build_specs(cfg, "/m", tmp_path) if s.name == "executor-0-0")
    assert spec.group == "" and "--rank" not in spec.argv


@pytest.mark.parametrize("raw,match", [
    ({"tensor_parallel": 0}, "tensor_parallel must be at least 1"),
    ({"tensor_parallel": 2, "replica_ports": [{"executors": [5000]}]}, "lists 1 ports"),
    ({"tensor_paralel": 2}, "unknown mesh.yaml keys: tensor_paralel"),
    ({"engine": {"blocksize": 8}}, "unknown engine keys: blocksize"),
])
def test_bad_config_is_a_clear_error(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


def test_up_refuses_a_tensor_parallel_size_the_model_cannot_split(tiny_model_dir, tmp_path):
    import subprocess
    import sys
    import yaml
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "tensor_parallel": 3,
                                   "run_dir": str(tmp_path / "run")}))
    proc = subprocess.run([sys.executable, "-m", "llmesh.mesh.cli", "up", "--detach", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "tensor_parallel=3 does not divide 4 attention heads" in proc.stderr
    assert not (tmp_path / "run" / "state.json").exists()


def test_automatic_ports_are_all_distinct():
    cfg = resolve_ports(parse_config({"replicas": 3, "tensor_parallel": 2, "routers": 2,
                                      "envoy": {"port": 0, "admin_port": 0}}))
    ports = [cfg.envoy.port, cfg.envoy.admin_port, cfg.observability.collector_port,
             cfg.kvcache_port, *cfg.router_ports, *cfg.tokenizer_ports, *cfg.http_ports,
             *cfg.observability.metrics_ports.values()]
    for r in cfg.replica_ports:
        ports += [r.scheduler, r.dist_port, *r.executors]
    # 2 routers with an HTTP port each; metrics: 2 routers, 1 tokenizer, kvcache,
    # 3 schedulers, 6 ranks
    assert len(ports) == len(set(ports)) == 4 + 2 + 2 + 1 + (2 + 1 + 1 + 3 + 6) + 3 * 4


def test_admission_section_reaches_router_and_scheduler(tmp_path):
    import json

    from llmesh.mesh.config import load_config
    from llmesh.services.router.admission import Admission
    from llmesh.services.router.tenants import hash_key
    from llmesh.services.scheduler.policy import policy_from_dict

    (tmp_path / "keys.yaml").write_text(
        f"tenants:\n  acme:\n    keys: ['{hash_key('k1')}']\n    classes: [batch]\n")
    (tmp_path / "mesh.yaml").write_text(
        "admission:\n  keys_file: keys.yaml\n  kv_watermark: 0.15\n  priorities: false\n"
        "  classes: {batch: {max_queued_requests: 7, timeout_s: 30}}\n")
    cfg = resolve_ports(load_config(tmp_path / "mesh.yaml"))
    assert cfg.admission.keys_file == str(tmp_path / "keys.yaml")  # relative to mesh.yaml
    specs = {s.name: s for s in build_specs(cfg, "/models/m", tmp_path)}
    for name in ("router-0", "scheduler-0"):
        argv = specs[name].argv
        passed = json.loads(argv[argv.index("--admission") + 1])
        assert passed["kv_watermark"] == 0.15 and passed["classes"]["batch"]["timeout_s"] == 30
    policy = policy_from_dict(passed)
    assert not policy.priorities and policy.kv_watermark == 0.15
    assert policy.limits("batch").max_queued_requests == 7
    assert policy.limits("interactive").max_queued_requests == 128  # defaults kept
    adm = Admission.from_dict(passed)
    assert adm.class_timeouts["batch"] == 30
    tenant, cls = adm.authorize([("x-api-key", "k1")], "default", None)
    assert tenant.name == "acme" and cls == "batch"
    assert adm.deadline("batch", 0, None, now=100.0) == 130.0
    assert adm.deadline("batch", 500, None, now=100.0) == 100.5  # the request's own timeout
    assert adm.deadline("batch", 0, 2.0, now=100.0) == 102.0  # an earlier gRPC deadline


@pytest.mark.parametrize("admission,message", [
    ({"state": "redis"}, "redis_url"),
    ({"state": "disk"}, "admission.state"),
    ({"kv_watermark": 1.5}, "kv_watermark"),
    ({"classes": {"urgent": {"weight": 2}}}, "unknown class"),
    ({"classes": {"batch": {"weight": 0}}}, "positive"),
    ({"classes": {"batch": {"size": 3}}}, "unknown keys"),
    ({"keys_file": "/nonexistent/keys.yaml"}, "not a file"),
    ({"quotas": 1}, "unknown admission keys"),
])
def test_bad_admission_config_is_a_clear_error(admission, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"admission": admission})


def test_keys_new_prints_a_key_and_its_hash(capsys):
    import json

    from llmesh.mesh.cli import main
    from llmesh.services.router.tenants import hash_key
    assert main(["keys", "new", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hash"] == hash_key(out["key"]) and out["key"] not in out["hash"]


def test_tls_listener_and_its_config_checks(tmp_path):
    from llmesh.mesh.envoy import render_envoy
    from llmesh.mesh.tls import with_certificate
    with pytest.raises(ConfigError, match="go together"):
        parse_config({"envoy": {"tls_cert_file": "/x.crt"}})
    plain = render_envoy(resolve_ports(parse_config({})))
    assert "transport_socket" not in plain["static_resources"]["listeners"][0]["filter_chains"][0]
    cfg = parse_config({"envoy": {"tls_cert_file": str(tmp_path / "missing.crt"),
                                  "tls_key_file": str(tmp_path / "missing.key")}})
    with pytest.raises(ConfigError, match="is not a file"):
        with_certificate(cfg, tmp_path)
    (tmp_path / "a.crt").write_text("cert")
    (tmp_path / "a.key").write_text("key")
    cfg = with_certificate(parse_config({"envoy": {"tls_cert_file": str(tmp_path / "a.crt"),
                                                   "tls_key_file": str(tmp_path / "a.key")}}),
                           tmp_path)
    chain = render_envoy(resolve_ports(cfg))["static_resources"]["listeners"][0]["filter_chains"][0]
    tls = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["alpn_protocols"] == ["h2", "http/1.1"]
    assert tls["tls_certificates"] == [{"certificate_chain": {"filename": str(tmp_path / "a.crt")},
                                        "private_key": {"filename": str(tmp_path / "a.key")}}]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the CA is made by openssl")
def test_upstream_mtls_makes_the_mesh_ca_and_puts_it_on_both_sides(tmp_path):
    import subprocess
    from llmesh.mesh.envoy import render_envoy, router_clusters
    from llmesh.mesh.tls import with_certificate
    plain = resolve_ports(parse_config({"http_api": True}))
    assert all("transport_socket" not in c for c in router_clusters(plain))
    assert "--mtls-dir" not in _router_argv(plain, tmp_path)
    cfg = resolve_ports(with_certificate(parse_config({"http_api": True,
                                                       "envoy": {"upstream_mtls": True}}), tmp_path))
    d = tmp_path / "tls" / "upstream"
    assert cfg.envoy.upstream_mtls_dir == str(d)
    assert sorted(p.name for p in d.iterdir()) == ["ca.crt", "gateway.crt", "gateway.key",
                                                   "router.crt", "router.key"]  # no CA key left
    assert (d / "router.key").stat().st_mode & 0o077 == 0
    for cert, purpose in (("router.crt", "sslserver"), ("gateway.crt", "sslclient")):
        out = subprocess.run(["openssl", "verify", "-CAfile", str(d / "ca.crt"), "-purpose",
                              purpose, str(d / cert)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    # the gateway's own client certificate is not a server's, nor the router's a client's
    out = subprocess.run(["openssl", "verify", "-CAfile", str(d / "ca.crt"), "-purpose",
                          "sslserver", str(d / "gateway.crt")], capture_output=True, text=True)
    assert out.returncode != 0
    clusters = {c["name"]: c for c in render_envoy(cfg)["static_resources"]["clusters"]}
    for name, alpn in (("routers", ["h2"]), ("http", ["http/1.1"])):
        tls = clusters[name]["transport_socket"]["typed_config"]
        assert tls["sni"] == "localhost"
        ctx = tls["common_tls_context"]
        assert ctx["alpn_protocols"] == alpn
        assert ctx["tls_certificates"] == [{"certificate_chain": {"filename": str(d / "gateway.crt")},
                                            "private_key": {"filename": str(d / "gateway.key")}}]
        assert ctx["validation_context"]["trusted_ca"] == {"filename": str(d / "ca.crt")}
    argv = _router_argv(cfg, tmp_path)
    assert argv[argv.index("--mtls-dir") + 1] == str(d)
    before = (d / "router.crt").read_bytes()
    with_certificate(parse_config({"envoy": {"upstream_mtls": True}}), tmp_path)
    assert (d / "router.crt").read_bytes() == before  # reused, not made again


def _router_argv(cfg, run_dir) -> list[str]:
    return next(s for s in build_specs(cfg, "/models/m", run_dir) if s.name == "router-0").argv


def test_models_each_get_their_processes_numbers_and_replica_set(tmp_path):
    import json
    raw = {"model_name": "chat", "replicas": 2, "engine": {"max_num_seqs": 32, "num_kv_blocks": 64},
           "envoy": {"port": 0, "admin_port": 0},
           "models": [{"name": "org/small", "model": "/models/s", "replicas": 1,
                       "tensor_parallel": 2, "engine": {"max_num_seqs": 8}}]}
    cfg = resolve_ports(parse_config(raw))
    small = cfg.models[0]
    assert small.engine.max_num_seqs == 8 and small.engine.num_kv_blocks == 64  # (inherited)
    # replica numbers are the mesh's: the extra model's come after the top-level ones
    assert [p.index for p in cfg.replica_ports] == [0, 1]
    assert [p.index for p in small.replica_ports] == [2]
    assert len(small.replica_ports[0].executors) == 2 and small.replica_ports[0].dist_port
    specs = {s.name: s for s in build_specs(cfg, "/models/c", tmp_path)}
    assert "tokenizer-org_small-0" in specs and "--model /models/s" in " ".join(
        specs["tokenizer-org_small-0"].argv)
    sched = " ".join(specs["scheduler-2"].argv)
    assert "--model /models/s" in sched and "--model-name org/small" in sched
    assert "--max-num-seqs 8" in sched and "--max-num-seqs 32" in " ".join(specs["scheduler-0"].argv)
    router = specs["router-0"].argv
    extra = json.loads(router[router.index("--models") + 1])
    assert [m["name"] for m in extra] == ["org/small"]
    assert extra[0]["tokenizer"] == f"127.0.0.1:{small.tokenizer_ports[0]}"
    listed = json.loads((tmp_path / "replicas-org_small.json").read_text())["replicas"]
    assert [e["name"] for e in listed] == ["replica-2"]
    assert len(json.loads((tmp_path / "replicas.json").read_text())["replicas"]) == 2
    # the resolved config reads back the same (what the supervisor process is given)
    assert parse_config(cfg.to_dict()) == cfg


def test_models_share_the_kv_memory_among_all_executors():
    cfg = parse_config({"replicas": 1, "models": [{"name": "b", "replicas": 3}]})
    shares = [v.engine.kv_memory_share for v in cfg.served()]
    assert shares == pytest.approx([0.5 / 4, 0.5 * 3 / 4])


@pytest.mark.parametrize("models,match", [
    ([{"name": "default"}], "model names must differ"),
    ([{"name": "a"}, {"name": "a"}], "model names must differ"),
    ([{"name": "a/b"}, {"name": "a:b"}], "differ only in"),
    ([{"name": "bad name"}], "letters, digits"),
    ([{"model": "tiny"}], r"models\[0\]: a mapping with a name"),
    ([{"name": "a", "replicaz": 2}], "unknown keys replicaz"),
    ([{"name": "a", "engine": {"blocksize": 8}}], r"models\[0\].engine: unknown keys"),
    ([{"name": "a", "replicas": 0}], r"models\[a\].replicas must be at least 1"),
])
def test_bad_models_are_clear_errors(models, match):
    with pytest.raises(ConfigError, match=match):
        parse_config({"models": models})


def test_the_cpu_decode_kernel_can_be_turned_off_for_the_executors(tmp_path):
    def executor_argv(raw):
        cfg = resolve_ports(parse_config(raw))
        return next(s for s in build_specs(cfg, "/models/m", tmp_path)
                    if s.name == "executor-0-0").argv
    assert "--no-cpu-decode-kernel" not in executor_argv({"engine": {"dtype": "bfloat16"}})
    assert "--no-cpu-decode-kernel" in executor_argv(
        {"engine": {"dtype": "bfloat16", "cpu_decode_kernel": False}})
