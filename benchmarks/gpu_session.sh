#!/usr/bin/env bash
# The GPU checks and measurements in one device call (an H100 or H200):
#   tests    python -m pytest tests/gpu -q (every failure, not just the first; the paged
#            prefill kernel's grid and the engine with it switched on included)
#   kernels  llmesh bench kernels: decode rows checked for head_dim 64/128/256, the
#            paged prefill kernel at the 1B shape  -> $OUT/kernels.json, $OUT/kernels.log
#   agree    SmolLM2-135M-Instruct, llmesh against transformers, bf16 and fp16, 32 prompts
#            x 128 greedy tokens (benchmarks/gpu_agreement.py) -> $OUT/agree.json, .log
#   mesh     a replica of the mesh (scheduler and executor processes) against the in-process
#            engine at the 1B shape (benchmarks/gpu_mesh.py) -> $OUT/mesh.json, .log
#   1b, 8b   llmesh bench gpu --shape llama-1b|llama-8b -> $OUT/gpu-<s>.json, .log
#            (1b: transformers' static batching at 64, 128 and 256, the engine against the fastest)
# each under `timeout`; then $OUT/summary.txt and the tables. Nothing is fetched: the GPU
# image has torch, CuPy, NVRTC, transformers, safetensors, tokenizers, pyyaml, jinja2,
# numpy, grpcio and prometheus-client, but not opentelemetry-api, which the engine
# imports (services/scheduler/loop.py). Carry it as a wheel, made here before the call:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl opentelemetry-api==1.45.2
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# (opentelemetry-api needs only typing-extensions, which the image has.) The mesh step's
# processes also import grpcio-health-checking and grpcio-reflection (add both to the
# same download, matching the image's grpcio), and the generated protos: carry
# `llmesh/v1` made here (`make protos`; it is ignored, so name it in carry). The generated
# protos (llmesh/v1) are not needed by the engine, the bench or tests/gpu; they are made
# only when grpc_tools is there (the image lacks grpcio-tools; carry its wheel, or carry
# llmesh/v1 made here, for anything that does need them).
#
# SmolLM2's GGUF (98 MB) is larger than one call's tree (64 MiB): carry it in two halves
# over two calls of one warm machine (an ignored path not carried stays there):
#
#   echo /.smol-a/ >> .git/info/exclude; echo /.smol-b/ >> .git/info/exclude
#   mkdir -p .smol-a .smol-b && split -n 2 -d "$(python -c 'from llmesh.mesh.default_model \
#       import smollm2_gguf; print(smollm2_gguf())')" .smol-a/part && mv .smol-a/part01 .smol-b/
#   run(command="ls -l .smol-a", carry=[".smol-a"], timeout_s=60)
#   run(command="STEPS='tests kernels agree mesh 1b' bash benchmarks/gpu_session.sh",
#       carry=[".smol-b", ".whl", "llmesh/v1"], timeout_s=600)
#
# The agree step joins the halves, checks the SHA-256 against SMOLLM2_SHA256 below and
# serves the file as every llmesh model is served from a GGUF file.
#
# Here, without a GPU:  bash benchmarks/gpu_session.sh --dry-run
# runs every step, with the tiny shape on the CPU in place of the two real ones.
# Environment: OUT (default: a new temp dir), PY (default python3; .venv/bin/python in a
# dry run), STEPS (default "tests kernels 1b 8b"), T_TESTS / T_KERNELS / T_1B / T_8B
# (timeouts in s), GPU_TESTS (default tests/gpu), ARGS_1B / ARGS_8B (more bench flags). Choose STEPS and timeouts to
# fit one call (600 s at most).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ $DRY = 1 ]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python3}; fi
OUT=${OUT:-$(mktemp -d /tmp/llmesh-gpu-session.XXXXXX)}
STEPS=${STEPS:-tests kernels agree mesh 1b 8b}
T_TESTS=${T_TESTS:-150} T_KERNELS=${T_KERNELS:-90} T_AGREE=${T_AGREE:-200} T_1B=${T_1B:-240}
T_MESH=${T_MESH:-240}
T_8B=${T_8B:-260}
SMOLLM2_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$OUT"
ENV_LOG=$OUT/env.txt SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)

note() { echo "[gpu-session +$(( $(date +%s) - T0 ))s] $*" | tee -a "$SUMMARY"; }

# ---- setup: carried wheels, the project, protos, what imports --------------------
{
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/llmesh-site .whl/*.whl && export PYTHONPATH="/tmp/llmesh-site:$PYTHONPATH"
    echo "wheels: $(ls .whl)"
  fi
  if [ $DRY = 0 ]; then  # the `llmesh` script; PYTHONPATH already covers the imports
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
        || echo "pip install -e . failed: running from PYTHONPATH=$ROOT"
  fi
  if ! ls llmesh/v1/*_pb2.py >/dev/null 2>&1; then
    if "$PY" -c "import grpc_tools" 2>/dev/null; then
      mkdir -p llmesh/v1 && touch llmesh/__init__.py llmesh/v1/__init__.py
      "$PY" -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. \
          protos/llmesh/v1/*.proto && echo "protos: generated"
    else
      echo "protos: grpc_tools missing, not generated (bench gpu and tests/gpu do not need them)"
    fi
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
      --format=csv,noheader
  "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "safetensors", "tokenizers", "numpy", "yaml", "jinja2",
             "opentelemetry.trace", "cupy", "llmesh.services.engine.engine", "llmesh.benchmarks.gpu_bench",
             "llmesh.benchmarks.gpu_decode", "llmesh.benchmarks.hf_targets",
             "transformers.generation.configuration_utils:ContinuousBatchingConfig"):
    try:
        name, _, attr = name.partition(":")
        mod = importlib.import_module(name)
        if attr:
            getattr(mod, attr)
            name = f"{name}.{attr}"
        print(f"ok      {name} {getattr(mod, '__version__', '')}")
    except Exception as e:  # noqa: BLE001
        hint = " -> carry opentelemetry-api as a wheel (see the script's header)" \
            if "opentelemetry" in str(e) else ""
        print(f"MISSING {name}: {type(e).__name__}: {e}{hint}")
try:
    import torch
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        print("cuda", torch.version.cuda, torch.cuda.get_device_name(0),
              f"{free / 2**30:.1f}/{total / 2**30:.1f} GiB free")
    else:
        print("cuda: not available")
except Exception as e:  # noqa: BLE001
    print("torch:", e)
EOF
} >"$ENV_LOG" 2>&1
cat "$ENV_LOG"
note "setup done (dry run: $DRY); OUT=$OUT"

run_step() {  # name, timeout, log file, command...
  local name=$1 limit=$2 log=$3 t rc
  shift 3
  t=$(date +%s)
  note "$name: starting (timeout ${limit}s)"
  timeout -k 15 "$limit" "$@" >"$log" 2>&1
  rc=$?
  note "$name: rc=$rc$([ $rc = 124 ] && echo ' (timed out)') in $(( $(date +%s) - t ))s"
}

if [ $DRY = 1 ]; then
  TINY="--shape tiny-llama --device cpu --dtype float32 --requests 4 --prompt-tokens 16
        --output-tokens 4 --batches 1,4 --decode-steps 3 --hf-batch-size 2"
  SHAPE_1B=$TINY SHAPE_8B=$TINY
else
  # transformers' static batching at 64, 128 and 256: the engine against the fastest
  SHAPE_1B="--shape llama-1b --device cuda --dtype bfloat16 --hf-batch-size 64,128,256"
  SHAPE_8B="--shape llama-8b --device cuda --dtype bfloat16"
fi
for step in $STEPS; do
  case $step in
    tests) run_step "pytest tests/gpu" "$T_TESTS" "$OUT/pytest-gpu.log" \
               "$PY" -m pytest ${GPU_TESTS:-tests/gpu} -p no:cacheprovider -rfE ;;  # (-q: pyproject; twice hides the summary)
    kernels) if [ $DRY = 1 ]; then note "kernels: needs a GPU (skipped in a dry run)"; else
               run_step "bench kernels" "$T_KERNELS" "$OUT/kernels.log" "$PY" -m llmesh.mesh.cli bench \
                   kernels --json "$OUT/kernels.json"; fi ;;
    agree) if [ $DRY = 1 ]; then
             AGREE_MODEL=smollm2 AGREE_ARGS="--device cpu --dtypes float32,bfloat16 --prompts 2 --tokens 8"
           else
             AGREE_MODEL=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf AGREE_ARGS=""
             mkdir -p /tmp/smollm2 && cat .smol-a/part* .smol-b/part* >"$AGREE_MODEL" 2>/dev/null
             echo "$SMOLLM2_SHA256  $AGREE_MODEL" | sha256sum -c - >>"$SUMMARY" 2>&1 \
                 || note "agree: SmolLM2 halves missing or wrong (see the header)"
           fi
           # shellcheck disable=SC2086
           run_step "agreement" "$T_AGREE" "$OUT/agree.log" "$PY" -m llmesh.benchmarks.gpu_agreement \
               --model "$AGREE_MODEL" --json "$OUT/agree.json" $AGREE_ARGS ;;
    mesh) if [ $DRY = 1 ]; then
            MESH_ARGS="--device cpu --shape tiny-llama --dtype float32 --requests 8 --prompt-tokens 16 --output-tokens 8"
          else
            MESH_ARGS="--device cuda --shape llama-1b --dtype bfloat16"
          fi
          # shellcheck disable=SC2086
          run_step "mesh vs engine" "$T_MESH" "$OUT/mesh.log" "$PY" -m llmesh.benchmarks.gpu_mesh \
              --json "$OUT/mesh.json" $MESH_ARGS ;;
    1b) # shellcheck disable=SC2086
        run_step "bench gpu 1b" "$T_1B" "$OUT/gpu-1b.log" "$PY" -m llmesh.mesh.cli bench gpu \
            $SHAPE_1B --no-progress --json "$OUT/gpu-1b.json" ${ARGS_1B:-} ;;
    8b) # shellcheck disable=SC2086
        run_step "bench gpu 8b" "$T_8B" "$OUT/gpu-8b.log" "$PY" -m llmesh.mesh.cli bench gpu \
            $SHAPE_8B --no-progress --json "$OUT/gpu-8b.json" ${ARGS_8B:-} ;;
    *) note "unknown step $step (tests, kernels, agree, mesh, 1b, 8b)" ;;
  esac
done

echo
[ -f "$OUT/pytest-gpu.log" ] && grep -E "^(FAILED|ERROR)|passed|failed|skipped|error" "$OUT/pytest-gpu.log" | tail -n 30
[ -f "$OUT/kernels.log" ] && { echo; grep -E "Error|Traceback" "$OUT/kernels.log" | tail -5;
  sed -n '/^## llmesh bench kernels/,$p' "$OUT/kernels.log"; }
[ -f "$OUT/agree.log" ] && { echo; echo "==== agreement ===="; grep -E '^\[gpu_agreement\]|Error|Traceback' "$OUT/agree.log" | tail -n 12; }
[ -f "$OUT/mesh.log" ] && { echo; echo "==== mesh vs engine ===="; grep -E '^\[gpu_mesh\]|mesh_over_engine|identical_requests|Error|Traceback' "$OUT/mesh.log" | tail -n 12; }
for s in 1b 8b; do
  log=$OUT/gpu-$s.log
  [ -f "$log" ] || continue
  echo; echo "==== bench gpu $s ===="
  grep -E '^\[bench gpu\]|Error|Traceback' "$log" | tail -n 20
  sed -n '/^## llmesh bench gpu/,$p' "$log"
done
echo; cat "$SUMMARY"
