"""deploy/kubernetes: valid against the Kubernetes schemas (kubernetes-validate, strict),
with probes on the ports that serve health, a GPU for the executor, grace past the drains,
disruption budgets, an autoscaler on a scheduler gauge, and command lines that the
services' own argparse accepts with mesh.yaml's settings."""
from __future__ import annotations

import argparse
import ast
import copy
import importlib
import importlib.util
import inspect
import json
import re
import runpy
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from kubernetes_validate.utils import ValidationError, validate, latest_version

from llmesh.mesh.config import load_config, parse_config
from llmesh.mesh.ports import resolve_ports
from llmesh.mesh.envoy import envoy_binary, render_envoy, xds_clusters
from llmesh.mesh.supervisor import build_specs
from llmesh.observability.metrics import SchedulerCollector

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
BASE = K8S / "base"
MESH_YAML = ROOT / "mesh" / "mesh.yaml"
# what kubelet puts in a container's env for a downward-API field (a sample pod's)
FIELD_SAMPLES = {"metadata.labels['apps.kubernetes.io/pod-index']": "0",
                 "metadata.namespace": "llmesh"}
OLDEST = "1.29.0"  # native sidecars (restartPolicy: Always) and the pod-index label


def load_docs(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return [d for name in kustomization["resources"]
            for d in yaml.safe_load_all((directory / name).read_text()) if d]


DOCS = load_docs(BASE)
CONFIGMAPS = {d["metadata"]["name"]: d["data"] for d in DOCS if d["kind"] == "ConfigMap"}


def find(kind: str, name: str, docs=DOCS) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def workloads(docs=DOCS) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def running_containers(workload: dict) -> list[dict]:
    """Its containers and native sidecars: what runs as long as the pod does."""
    spec = workload["spec"]["template"]["spec"]
    return spec["containers"] + [c for c in spec.get("initContainers", [])
                                 if c.get("restartPolicy") == "Always"]


def container(name: str, docs=DOCS) -> tuple[dict, dict]:
    """(workload, container) of the running container `name`."""
    (found,) = [(w, c) for w in workloads(docs) for c in running_containers(w) if c["name"] == name]
    return found


def argv_env(c: dict, configmaps=CONFIGMAPS) -> dict:
    """The container's environment (a sample pod's, for downward-API fields)."""
    env = {}
    for source in c.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for e in c.get("env", []):
        env[e["name"]] = (e["value"] if "value" in e
                          else FIELD_SAMPLES[e["valueFrom"]["fieldRef"]["fieldPath"]])
    return env


def argv(c: dict, configmaps=CONFIGMAPS) -> list[str]:
    """The container's command line as kubelet runs it: $(VAR) expanded from its env."""
    env = argv_env(c, configmaps)

    def expand(arg: str) -> str:
        def var(m):
            assert m.group(1) in env, f"{c['name']}: $({m.group(1)}) is not in its env"
            return env[m.group(1)]
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", var, arg)
    return [expand(a) for a in c.get("command", []) + c.get("args", [])]


class _Parsed(Exception):
    pass


def parse_with_entry_point(module: str, args: list[str]) -> argparse.Namespace:
    """`python -m module args...` up to its argparse: the real parser, run as
    __main__ runs it, stopped once it has parsed (a bad flag fails here)."""
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    real, parsed = argparse.ArgumentParser.parse_args, {}

    def capture(self, args=None, namespace=None):
        parsed["args"] = real(self, args, namespace)
        raise _Parsed

    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (found in sys.modules: imported)
        mp.setattr(argparse.ArgumentParser, "parse_args", capture)
        mp.setattr(sys, "argv", [module, *args])
        with pytest.raises(_Parsed):
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    # mesh.xds takes its Envoy messages from xds-protos' own folder: they leave again,
    # so that its `envoy` package hides not the Envoy binary's (mesh.envoy.envoy_binary)
    for name in set(sys.modules) - before:
        where = [getattr(sys.modules[name], "__file__", None) or ""]
        where += list(getattr(sys.modules[name], "__path__", ()))
        if any("xds-protos" in str(w) for w in where):
            del sys.modules[name]
    return parsed["args"]


def service_args(name: str, docs=DOCS, configmaps=CONFIGMAPS) -> tuple[str, argparse.Namespace]:
    """(module, parsed flags) of the running container `name` (python -m MODULE ...)."""
    line = argv(container(name, docs)[1], configmaps)
    assert line[:2] == ["python", "-m"], line
    return line[2], parse_with_entry_point(line[2], line[3:])


def test_every_manifest_is_in_the_kustomization():
    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in BASE.glob("*.yaml")
                                    if p.name != "kustomization.yaml")
    assert yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"] == ["base"]


@pytest.mark.parametrize("version", [OLDEST, latest_version()])
def test_manifests_are_valid_kubernetes_objects(version):
    kinds = set()
    for doc in DOCS:
        validate(doc, version, strict=True)
        kinds.add(doc["kind"])
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    # (the schemas do catch a mistake: a misspelt probe field)
    broken = copy.deepcopy(find("Deployment", "llmesh-router"))
    c = broken["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(ValidationError):
        validate(broken, version, strict=True)


def test_every_container_has_probes_on_the_port_it_serves_health_on():
    for w in workloads():
        for c in running_containers(w):
            assert "readinessProbe" in c and "livenessProbe" in c, c["name"]
            assert "grpc" in c["readinessProbe"], c["name"]  # grpc.health.v1 everywhere
            live = c["livenessProbe"]
            assert "grpc" in live or "tcpSocket" in live, c["name"]
            line = argv(c)
            if line[:2] == ["python", "-m"]:
                args = parse_with_entry_point(line[2], line[3:])
                port = args.port
                # kubelet probes the pod's address: the service is told to listen there
                host = args.host if line[2] == "llmesh.mesh.xds" else argv_env(c)["LLMESH_BIND_HOST"]
                assert host == "0.0.0.0", c["name"]
            else:  # Envoy: gRPC health is answered by a router through its listener
                port = envoy_bootstrap()["static_resources"]["listeners"][0]["address"][
                    "socket_address"]["port_value"]
            for probe in (c["readinessProbe"], live, c.get("startupProbe", {})):
                for kind in ("grpc", "tcpSocket"):
                    if kind in probe:
                        assert probe[kind]["port"] == port, (c["name"], kind)
            assert port in {p["containerPort"] for p in c["ports"]}, c["name"]


def test_the_executor_has_a_gpu():
    w, c = container("executor")
    assert w["kind"] == "StatefulSet"
    for key in ("requests", "limits"):
        assert c["resources"][key]["nvidia.com/gpu"] == 1
    _, args = service_args("executor")
    assert args.device == "cuda" and args.num_kv_blocks > 0  # CUDA: an explicit KV size
    for w in workloads():  # and nothing else asks for one
        spec = w["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c["name"] == "executor" or "nvidia.com/gpu" not in str(c.get("resources"))
            assert "limits" in c["resources"] and "memory" in c["resources"]["requests"]


def pre_stop_max_s(c: dict) -> float:
    line = c["lifecycle"]["preStop"]["exec"]["command"]
    assert line[:3] == ["python", "-m", "llmesh.mesh.k8s_drain"]
    return parse_with_entry_point("llmesh.mesh.k8s_drain", line[3:]).max_s


def test_grace_periods_outlast_the_drains():
    drain_s = load_config(MESH_YAML).engine.drain_timeout_s
    w, _ = container("scheduler")
    _, args = service_args("scheduler")
    assert args.drain_timeout_s == drain_s
    # the scheduler drains, then its executor (a sidecar) gets SIGTERM and stops in 5 s
    assert w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain_s + 5 + 5
    for name in ("router", "envoy"):
        w, c = container(name)
        # preStop, then SIGTERM: a router stops within 5 s
        assert w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > (
            pre_stop_max_s(c) + 5 + 5)
    for w in workloads():
        assert w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30


def test_disruption_budgets_cover_routers_gateway_and_model_replicas():
    pdbs = [d for d in DOCS if d["kind"] == "PodDisruptionBudget"]
    for kind, name in (("Deployment", "llmesh-router"), ("Deployment", "llmesh-gateway"),
                       ("StatefulSet", "llmesh-model")):
        w = find(kind, name)
        (pdb,) = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items()
                  <= w["spec"]["template"]["metadata"]["labels"].items()]
        spec = pdb["spec"]
        # one pod at a time, never all of them
        if "minAvailable" in spec:
            assert 1 <= spec["minAvailable"] < w["spec"]["replicas"]
        else:
            assert spec["maxUnavailable"] == 1
        assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_the_autoscaler_scales_the_replicas_the_routers_know():
    hpa = find("HorizontalPodAutoscaler", "llmesh-model")
    sts = find("StatefulSet", "llmesh-model")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                             "name": "llmesh-model"}
    assert "replicas" not in sts["spec"]  # the autoscaler owns it
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"  # per pod, through prometheus-adapter
    # a gauge the scheduler exports
    assert f'GaugeMetricFamily("{metric["pods"]["metric"]["name"]}"' in inspect.getsource(
        SchedulerCollector)
    _, sched = service_args("scheduler")
    _, router = service_args("router")
    svc = sts["spec"]["serviceName"]
    assert router.schedulers.split(",") == [f"llmesh-model-{i}.{svc}:{sched.port}"
                                            for i in range(hpa["spec"]["maxReplicas"])]
    headless = find("Service", svc)
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert sched.replica_name == "replica-0"  # pod llmesh-model-0: the router's replica-0


def serving_port(service: dict, port: int, docs=DOCS) -> int:
    """The container port behind a Service's `port`."""
    (p,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    (w,) = [w for w in workloads(docs) if service["spec"]["selector"].items()
            <= w["spec"]["template"]["metadata"]["labels"].items()]
    target = p["targetPort"]
    ports = [cp for c in running_containers(w) for cp in c.get("ports", [])]
    (cp,) = [cp for cp in ports if target in (cp["containerPort"], cp.get("name"))]
    return cp["containerPort"]


def test_addresses_on_the_command_lines_reach_the_services():
    ports = {name: service_args(name)[1].port
             for name in ("router", "tokenizer", "kvcache", "scheduler", "executor")}
    _, router = service_args("router")
    _, sched = service_args("scheduler")
    for address, serves in ((router.tokenizer, "tokenizer"), (router.kvcache, "kvcache"),
                            (sched.kvcache, "kvcache")):
        host, port = address.rsplit(":", 1)
        assert serving_port(find("Service", host), int(port)) == ports[serves]
    assert sched.executors == f"127.0.0.1:{ports['executor']}"  # in the same pod
    assert container("executor")[0] is container("scheduler")[0]
    for name in ("grpc", "http"):  # the EndpointSlice ports the gateway's control plane reads
        (p,) = [p for p in find("Service", "llmesh-router")["spec"]["ports"] if p["name"] == name]
        assert serving_port(find("Service", "llmesh-router"), p["port"]) == (
            router.port if name == "grpc" else router.http_port)


def test_services_run_with_mesh_yaml_settings(tmp_path):
    """Flag for flag, what `llmesh up` runs on mesh.yaml, but for addresses, the
    model's path and what a GPU needs."""
    local = {s.name: s.argv for s in build_specs(resolve_ports(load_config(MESH_YAML)),
                                                 "/models/tiny", tmp_path)}
    differ = {"router": {"port", "tokenizer", "schedulers", "replica_set", "kvcache", "http_port",
                        "model"},
              "scheduler": {"port", "model", "kvcache", "executors", "replica_name",
                            "num_kv_blocks"},
              "executor": {"port", "model", "device", "num_kv_blocks", "kv_memory_share",
                           "threads"},
              "tokenizer": {"port", "model"}, "kvcache": {"port"}}
    names = {"router": "router-0", "scheduler": "scheduler-0", "executor": "executor-0-0",
             "tokenizer": "tokenizer-0", "kvcache": "kvcache"}
    for name, allowed in differ.items():
        module, ours = service_args(name)
        theirs = local[names[name]]
        assert theirs[2] == module
        theirs = vars(parse_with_entry_point(module, theirs[3:]))
        ours = vars(ours)
        assert ours.keys() == theirs.keys()
        for key in ours.keys() - allowed:
            a, b = ours[key], theirs[key]
            if key == "admission":
                a, b = json.loads(a), json.loads(b)
            assert a == b, (name, key)
    assert service_args("router")[1].model == CONFIGMAPS["llmesh-config"]["LLMESH_MODEL_DIR"]


def envoy_bootstrap() -> dict:
    return yaml.safe_load(CONFIGMAPS["llmesh-gateway"]["envoy.yaml"])


def mounted(c: dict, workload: dict, path: str) -> tuple[str, str]:
    """(ConfigMap, key) mounted at `path` in the container."""
    (m,) = [m for m in c["volumeMounts"] if m["mountPath"] == path]
    (v,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == m["name"]]
    return v["configMap"]["name"], m["subPath"]


def test_the_gateway_runs_what_mesh_envoy_renders(tmp_path):
    _, xds = service_args("xds")
    cfg = parse_config({**yaml.safe_load(MESH_YAML.read_text()), "routers": 1, "router_ports": [50051],
                        "http_ports": [8081], "observability": {"tracing": "off"}})
    expected = render_envoy(cfg, xds.port)
    expected["static_resources"]["listeners"][0]["address"]["socket_address"]["address"] = "0.0.0.0"
    assert envoy_bootstrap() == expected
    assert json.loads(CONFIGMAPS["llmesh-gateway"]["xds-clusters.json"]) == xds_clusters(cfg)
    w, envoy = container("envoy")
    line = argv(envoy)
    # python -c CODE ARGS: the code execs mesh.envoy.envoy_binary() with ARGS
    assert line[:2] == ["python", "-c"] and "envoy_binary()" in line[2]
    check_imports(line[2])
    config_at = line.index("-c", 3) + 1
    assert mounted(envoy, w, line[config_at]) == ("llmesh-gateway", "envoy.yaml")
    # the Envoy binary takes the pod's flags and bootstrap (validated, not served)
    (tmp_path / "envoy.yaml").write_text(CONFIGMAPS["llmesh-gateway"]["envoy.yaml"])
    line[config_at] = str(tmp_path / "envoy.yaml")
    subprocess.run([envoy_binary(), *line[3:], "--mode", "validate"], check=True,
                   capture_output=True, timeout=60)
    assert mounted(container("xds")[1], w, xds.clusters) == ("llmesh-gateway", "xds-clusters.json")
    assert xds.endpointslices == "llmesh-router"
    port = expected["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    assert serving_port(find("Service", "llmesh-gateway"), 8080) == port


def check_imports(code: str) -> None:
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module}.{alias.name}"


def test_init_containers_make_the_default_model():
    for w in workloads():
        for c in w["spec"]["template"]["spec"].get("initContainers", []):
            if c.get("restartPolicy") == "Always":
                continue
            line = argv(c)
            assert line[:2] == ["python", "-c"] and "make_tiny(" in line[2]
            check_imports(line[2])
            model_dir = CONFIGMAPS["llmesh-config"]["LLMESH_MODEL_DIR"]
            (m,) = [m for m in c["volumeMounts"] if model_dir.startswith(m["mountPath"] + "/")]
            for other in running_containers(w):  # the same volume where the services read it
                assert any(o["name"] == m["name"] and o["mountPath"] == m["mountPath"]
                           for o in other.get("volumeMounts", [])) or "--model" not in argv(other)


def test_only_the_control_plane_reads_the_api_and_only_endpointslices():
    role = find("Role", "llmesh-xds")
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    binding = find("RoleBinding", "llmesh-xds")
    assert binding["roleRef"]["name"] == "llmesh-xds"
    (subject,) = binding["subjects"]
    for w in workloads():
        spec = w["spec"]["template"]["spec"]
        reads_api = w["metadata"]["name"] == "llmesh-gateway"
        assert spec["automountServiceAccountToken"] is reads_api
        if reads_api:
            assert spec["serviceAccountName"] == subject["name"]


@pytest.mark.skipif(not shutil.which("kubectl"), reason="needs kubectl (its kustomize)")
def test_the_kustomizations_build_and_the_cpu_overlay_drops_the_gpu():
    def build(path: Path) -> list[dict]:
        out = subprocess.run(["kubectl", "kustomize", str(path)], check=True,
                             capture_output=True, text=True, timeout=60).stdout
        return [d for d in yaml.safe_load_all(out) if d]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, build(K8S))) == sorted(map(key, DOCS))
    cpu = build(K8S / "cpu")
    assert sorted(map(key, cpu)) == sorted(map(key, DOCS))
    for doc in cpu:
        validate(doc, OLDEST, strict=True)
    assert "nvidia.com/gpu" not in str(container("executor", cpu)[1]["resources"])
    configmaps = {d["metadata"]["name"]: d["data"] for d in cpu if d["kind"] == "ConfigMap"}
    _, args = service_args("executor", cpu, configmaps)
    assert args.device == "cpu"
