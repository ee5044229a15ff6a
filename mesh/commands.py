"""`llmesh up / down / status / config show / generate` against a running mesh."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import yaml

import llmesh

from llmesh.mesh.config import ConfigError, MeshConfig, load_config
from llmesh.mesh.ports import resolve_ports

DEFAULT_CONFIG = Path(__file__).parent / "mesh.yaml"


def run_dir_of(cfg: MeshConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    base = os.environ.get("LLMESH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llmesh")
    return Path(base) / "run"


def effective_config(path: str | None) -> MeshConfig:
    return load_config(path or DEFAULT_CONFIG)


def model_dir_of(cfg: MeshConfig) -> str:
    from llmesh.mesh.default_model import resolve_model
    return str(resolve_model(cfg.model))


def with_model_dirs(cfg: MeshConfig) -> MeshConfig:
    """`models:` with each model's directory in place of what mesh.yaml names."""
    return dataclasses.replace(cfg, models=tuple(
        dataclasses.replace(m, model=model_dir_of(m)) for m in cfg.models))


def read_state(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # A zombie has exited: the detached supervisor is nobody's child once `up` returns,
    # and its exit status waits for init to collect it (up to a second or two).
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def cmd_up(args) -> int:
    cfg = resolve_ports(effective_config(args.config))
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = read_state(run_dir)
    if state and state.get("status") in ("ready", "starting") and _alive(state["supervisor_pid"]):
        print(f"llmesh: error: a mesh is already up (supervisor pid {state['supervisor_pid']}); "
              "run `llmesh down` first", file=sys.stderr)
        return 2
    from llmesh.services.common.errors import LlmeshError
    try:
        model_dir = model_dir_of(cfg)
        cfg = with_model_dirs(cfg)
        for i, view in enumerate(cfg.served()):
            if view.tensor_parallel > 1:
                from llmesh.services.executor.model_config import load_model_config
                from llmesh.services.executor.parallel import check_shardable
                check_shardable(load_model_config(view.model if i else model_dir),
                                view.tensor_parallel)
    except LlmeshError as e:
        print(f"llmesh: error: {e}", file=sys.stderr)
        return 2
    from llmesh.mesh.tls import tls_state, with_certificate
    try:
        cfg = with_certificate(cfg, run_dir)
    except ConfigError as e:
        print(f"llmesh: error: {e}", file=sys.stderr)
        return 2
    tls = tls_state(cfg)
    if tls:
        print(f"llmesh: TLS on {cfg.envoy.tls_cert_file}, SHA-256 fingerprint {tls['fingerprint']}")
    if cfg.envoy.upstream_mtls_dir:
        print(f"llmesh: mutual TLS between Envoy and the routers (the mesh's CA in "
              f"{cfg.envoy.upstream_mtls_dir})")
    resolved = run_dir / "mesh.resolved.yaml"
    resolved.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (run_dir / "state.json").unlink(missing_ok=True)
    if not args.detach:
        from llmesh.mesh.foreground import run_foreground
        return run_foreground(cfg, model_dir, run_dir, on_ready=lambda: print(
            f"llmesh: mesh up on 127.0.0.1:{cfg.envoy.port} (logs in {run_dir / 'logs'}); "
            "Ctrl-C to stop", flush=True))
    log = open(run_dir / "supervisor.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmesh.mesh.foreground", "--config", str(resolved), "--model-dir",
         model_dir, "--run-dir", str(run_dir)],
        cwd=Path(llmesh.__file__).resolve().parents[1], stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        state = read_state(run_dir)
        if state and state.get("status") == "ready":
            print(f"llmesh: mesh up on {state['endpoint']} (supervisor pid {proc.pid}, "
                  f"logs in {run_dir / 'logs'})")
            return 0
        if state and state.get("status") == "failed" or proc.poll() is not None:
            print(f"llmesh: error: mesh failed to start: {(state or {}).get('error')}; see "
                  f"{run_dir / 'supervisor.log'}", file=sys.stderr)
            return 1
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    print("llmesh: error: mesh did not come up in time", file=sys.stderr)
    return 1


def cmd_down(args) -> int:
    cfg = effective_config(args.config)
    run_dir = run_dir_of(cfg)
    state = read_state(run_dir)
    if not state or not _alive(state.get("supervisor_pid", 0)):
        print("llmesh: no mesh is up")
        return 0
    pid = state["supervisor_pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + args.timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not _alive(pid):
        print("llmesh: mesh down")
        return 0
    # The supervisor did not stop in time: it goes, and so does every process it ran
    # (its process group when it leads one, as `up --detach` starts it, and the pids it
    # last wrote), so that nothing is left serving without it.
    latest = read_state(run_dir) or state
    left = {name: p for name, p in {**state.get("pids", {}), **latest.get("pids", {})}.items()
            if _alive(p)}
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in [pid, *left.values()]:
        _kill(p)
    print(f"llmesh: the supervisor did not stop in {args.timeout:g} s; killed it and {len(left)} "
          f"processes ({', '.join(sorted(left)) or 'none'})", file=sys.stderr)
    return 1


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def cmd_scale(args) -> int:
    """Ask the running mesh for --replicas regular replicas (of --model, or the
    top-level model); wait for the outcome."""
    from llmesh.mesh.scaling import request_scale
    run_dir = run_dir_of(effective_config(args.config))
    state = read_state(run_dir)
    if not state or state.get("status") != "ready" or not _alive(state["supervisor_pid"]):
        print("llmesh: error: no mesh is up", file=sys.stderr)
        return 1
    if args.replicas < 1:
        print("llmesh: error: --replicas: at least 1", file=sys.stderr)
        return 2
    served = state.get("models") or {}
    model = args.model or ""
    if model and model not in served:
        print(f"llmesh: error: --model: {model!r} is not served (served: "
              f"{', '.join(served)})", file=sys.stderr)
        return 2
    request_id = request_scale(run_dir, args.replicas, model)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        state = read_state(run_dir) or {}
        scale = state.get("scale") or {}
        if scale.get("id") == request_id and scale.get("status") in ("ok", "failed"):
            now = (served and (state.get("models") or {}).get(scale.get("model"), {})
                   .get("replicas")) or state.get("replicas")
            if scale["status"] == "failed":
                print(f"llmesh: error: scaling failed: {scale.get('error')} (now "
                      f"{now} replicas)", file=sys.stderr)
                return 1
            print(f"llmesh: {now} replicas" + (f" of {model}" if model else ""))
            return 0
        time.sleep(0.2)
    print("llmesh: error: scaling did not finish in time", file=sys.stderr)
    return 1


def cmd_config_show(args) -> int:
    print(yaml.safe_dump(effective_config(args.config).to_dict(), sort_keys=False), end="")
    return 0


def cmd_status(args) -> int:
    from llmesh.v1 import scheduler_pb2, scheduler_pb2_grpc
    from llmesh.mesh.supervisor import is_serving
    cfg = effective_config(args.config)
    state = read_state(run_dir_of(cfg))
    if not state or state.get("status") != "ready" or not _alive(state["supervisor_pid"]):
        print("llmesh: no mesh is up", file=sys.stderr)
        return 1
    live = load_config_dict(state["config"])
    services = {}
    for i, p in enumerate(live.router_ports):
        services[f"router-{i}"] = is_serving(p, mtls_dir=live.envoy.upstream_mtls_dir)
    from llmesh.mesh.ports import tokenizer_process_name
    for model in (None,) + live.models:
        for i, p in enumerate((model or live).tokenizer_ports):
            services[tokenizer_process_name(model, i)] = is_serving(p)
    services["kvcache"] = is_serving(live.kvcache_port)
    replicas = []
    for view, ports in ((v, p) for v in live.served() for p in v.replica_ports):
        r = ports.index
        for rank, p in enumerate(ports.executors):
            services[f"executor-{r}-{rank}"] = is_serving(p)
        services[f"scheduler-{r}"] = is_serving(ports.scheduler)
        entry = {"replica": r, "model": view.model_name, "serving": services[f"scheduler-{r}"]}
        try:
            with grpc.insecure_channel(f"127.0.0.1:{ports.scheduler}") as ch:
                s = scheduler_pb2_grpc.SchedulerStub(ch).GetStats(scheduler_pb2.GetStatsRequest(),
                                                                  timeout=2)
            entry.update(running=s.num_running, waiting=s.num_waiting, kv_usage=s.kv_usage,
                         kv_used_blocks=s.num_used_blocks, kv_blocks=s.num_kv_blocks,
                         prefix_hit_rate=s.prefix_hit_rate,
                         steps=s.num_steps, preemptions=s.num_preemptions,
                         tensor_parallel=s.tensor_parallel, draining=s.is_draining,
                         ejected=s.is_ejected)
        except grpc.RpcError as e:
            entry["error"] = e.code().name
        replicas.append(entry)
    out = {"endpoint": state["endpoint"], "tls": state.get("tls"), "services": services,
           "replicas": replicas, "metrics": _scrape_summary(live)}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"endpoint {out['endpoint']}" + (
            f" (TLS, certificate SHA-256 {out['tls']['fingerprint']})" if out["tls"] else ""))
        for name, ok in services.items():
            print(f"  {name:14s} {'SERVING' if ok else 'NOT_SERVING'}")
        for r in replicas:
            print(f"  replica {r['replica']} ({r['model']}): running {r.get('running')} waiting {r.get('waiting')} "
                  f"kv {r.get('kv_usage', 0):.1%} ({r.get('kv_used_blocks')} of "
                  f"{r.get('kv_blocks')} blocks)"
                  + (" draining" if r.get("draining") else "")
                  + (" ejected (known-answer probe failed)" if r.get("ejected") else ""))
        m = out["metrics"]
        if m.get("requests") is not None:
            print(f"  requests {m['requests']:.0f} (errors {m['errors']:.0f}), tokens in "
                  f"{m['prompt_tokens']:.0f} out {m['generation_tokens']:.0f}, mean TTFT "
                  f"{m['mean_ttft_s'] * 1e3:.1f} ms, mean e2e {m['mean_e2e_s'] * 1e3:.1f} ms")
        for name, rss in m.get("rss_bytes", {}).items():
            print(f"  {name:14s} rss {rss / 2**20:.0f} MiB")
    return 0


def load_config_dict(raw: dict) -> MeshConfig:
    from llmesh.mesh.config import parse_config
    return parse_config(raw)


def cmd_generate_mesh(args) -> int:
    from llmesh.v1 import common_pb2, inference_pb2
    from llmesh.mesh.client import ResumingStream
    from llmesh.services.common import convert
    endpoint, tls, tls_ca = args.endpoint, args.tls, args.tls_ca
    if not endpoint:
        state = read_state(run_dir_of(effective_config(args.config)))
        if not state or state.get("status") != "ready":
            print("llmesh: error: no mesh is up (run `llmesh up`, or use --local)", file=sys.stderr)
            return 2
        endpoint = state["endpoint"]
        if state.get("tls"):
            tls, tls_ca = True, tls_ca or state["tls"]["ca_file"]
    sampling = common_pb2.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                         top_p=args.top_p, top_k=args.top_k,
                                         ignore_eos=args.ignore_eos)
    if args.seed is not None:
        sampling.seed = args.seed
    if args.speculative_tokens is not None:
        sampling.speculative_tokens = args.speculative_tokens
    req = inference_pb2.GenerateRequest(sampling=sampling, model=args.model or "",
                                        priority=convert.PRIORITY_VALUES.get(args.priority, 0))
    if args.raw:
        req.prompt = args.prompt
    else:
        req.chat.messages.add(role="user", content=args.prompt)
    api_key = args.api_key or os.environ.get("LLMESH_API_KEY", "")
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
    token_ids, text, finish = [], [], None
    # a stream the front door drops (a router or Envoy restarting) resumes where it broke
    stream = ResumingStream(endpoint, req, metadata=metadata, give_up_s=args.timeout,
                            tls=tls, tls_ca=tls_ca)
    try:
        for chunk in stream:
            token_ids.extend(chunk.token_ids)
            text.append(chunk.text)
            if chunk.finish_reason:
                finish = common_pb2.FinishReason.Name(chunk.finish_reason)
            if not args.json:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    except grpc.RpcError as e:
        print(f"\nllmesh: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"token_ids": token_ids, "text": "".join(text), "finish_reason":
                          finish.removeprefix("FINISH_REASON_").lower() if finish else None}))
    else:
        sys.stdout.write("\n")
    return 0


def cmd_trace(args) -> int:
    from llmesh.observability import trace_view
    if not args.last and not args.request_id:
        print("llmesh: error: give a REQUEST_ID or --last", file=sys.stderr)
        return 2
    path = Path(args.file) if args.file else run_dir_of(effective_config(args.config)) / "traces.jsonl"
    spans = trace_view.load_spans(path)
    if not spans:
        print(f"llmesh: error: no spans in {path} (is observability.tracing 'file'?)",
              file=sys.stderr)
        return 1
    trace_id = trace_view.find_trace(spans, None if args.last else args.request_id)
    if trace_id is None:
        print(f"llmesh: error: no trace for request {args.request_id!r} in {path}", file=sys.stderr)
        return 1
    from llmesh.observability.telemetry import EXPORT_INTERVAL_MS
    spans = trace_view.settle(path, spans, trace_id, EXPORT_INTERVAL_MS / 1e3 + 1.0)
    found = trace_view.trace_spans(spans, trace_id)
    print(trace_view.as_json(found) if args.json else trace_view.render(found))
    return 0


def scrape(port: int, timeout: float = 2.0) -> dict[str, float]:
    """One service's Prometheus text, as {series: value}."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


SUMMED = {"llmesh_prompt_tokens_total": "prompt_tokens",
          "llmesh_generation_tokens_total": "generation_tokens",
          "llmesh_time_to_first_token_seconds_sum": "ttft_sum",
          "llmesh_time_to_first_token_seconds_count": "ttft_count",
          "llmesh_e2e_request_latency_seconds_sum": "e2e_sum",
          "llmesh_e2e_request_latency_seconds_count": "e2e_count"}


def _scrape_summary(cfg: MeshConfig) -> dict:
    """Request totals over every router and each service's memory, from /metrics."""
    ports = cfg.observability.metrics_ports
    totals = {"requests": 0.0, "errors": 0.0, "prompt_tokens": 0.0, "generation_tokens": 0.0,
              "ttft_sum": 0.0, "ttft_count": 0.0, "e2e_sum": 0.0, "e2e_count": 0.0}
    rss, seen_router = {}, False
    for name, port in ports.items():
        try:
            m = scrape(port)
        except OSError:
            continue
        rss[name] = m.get("process_resident_memory_bytes", 0.0)
        if not name.startswith("router-"):
            continue
        seen_router = True
        for series, value in m.items():  # (every model's series)
            family = series.split("{", 1)[0]
            if family == "llmesh_requests_total":
                totals["requests"] += value
                if 'status="OK"' not in series:
                    totals["errors"] += value
            key = SUMMED.get(family)
            if key:
                totals[key] += value
    if not seen_router:
        return {"rss_bytes": rss}
    return {"requests": totals["requests"], "errors": totals["errors"],
            "prompt_tokens": totals["prompt_tokens"],
            "generation_tokens": totals["generation_tokens"],
            "mean_ttft_s": totals["ttft_sum"] / max(totals["ttft_count"], 1),
            "mean_e2e_s": totals["e2e_sum"] / max(totals["e2e_count"], 1), "rss_bytes": rss}


def cmd_keys_new(args) -> int:
    """A new API key and the hash that goes in the keys file (the key itself is never stored)."""
    from llmesh.services.router.tenants import hash_key, new_key
    key = new_key()
    if args.json:
        print(json.dumps({"key": key, "hash": hash_key(key)}))
    else:
        print(f"key:  {key}\nhash: {hash_key(key)}\n"
              "# put the hash under the tenant's keys: in the keys file; give the key to the tenant")
    return 0
