#!/usr/bin/env bash
# The GPU check: one command for a machine with a CUDA GPU that brings back every GPU figure the
# project needs, within a fixed time (default 540 s), each step time-boxed so that one failure or
# overrun loses nothing else. BENCHMARKS.md ("GPU check") says how to run it.
#
#   tools/gpu_check.sh [--dry-run] [--budget SECONDS] [--only STEP,STEP] [--skip STEP,STEP] [--no-e2e]
#
# On the GPU machine (run from the repository root, with .whl/ from tools/fetch_gpu_wheels.sh):
#   1. setup   a venv with --system-site-packages (the image's torch), the .whl/ wheels installed
#              offline, the project installed without dependencies
#   2. steps, in order of importance, each under `timeout`, each writing OUT/STEP.log (and JSON):
#        env                 versions, GPU, imports, an offscreen MuJoCo frame      env.json
#        pytest_gpu          pytest -m gpu (test/test_gpu.py, test/test_runtime_engine.py)  pytest_gpu.xml
#        bench_sim_eager     smp-ros bench --preset sim   --backend eager    --device cuda
#        bench_paper_eager   smp-ros bench --preset paper --backend eager    --device cuda
#        train_bench         smp-ros train-bench --preset sim paper (fp32, bf16)
#        bench_sim_compiled  smp-ros bench --preset sim   --backend compiled --device cuda
#        bench_paper_compiled smp-ros bench --preset paper --backend compiled --device cuda
#        cpu_tests           the model/runtime/train CPU tests under the image's PyTorch
#        e2e                 sim demos on every core, a short training run on the GPU, closed-loop eval
#      (every bench runs the |S| sweep 1..K and the dense DP of equal N_p in the same process; the
#      tensorrt backend's fallback on CUDA is a pytest_gpu test, env.json says whether torch_tensorrt exists)
#   3. OUT/summary.md and OUT/summary.json: each step's status, time and headline figures.
#
# --dry-run: the same steps on the CPU with the tiny preset and a few iterations (about a minute here;
# `make test-all` runs it), using the current environment instead of a new venv; compiled steps run with
# TORCH_COMPILE_DISABLE=1 (their plumbing, not inductor). OUT defaults to runs/gpu_check.
# Exit status: 0 when every step that ran passed; 1 otherwise (the summary says which).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=0
BUDGET=540
ONLY=""
SKIP=""
E2E=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --skip) SKIP=$2; shift ;;
    --no-e2e) E2E=0 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

OUT=${OUT:-runs/gpu_check}
rm -rf "$OUT/status"  # this run's steps only, in the summary
mkdir -p "$OUT/status"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
RESERVE=15  # seconds kept for the summary
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/smp_gpu_check_inductor}

log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }

wanted() {  # is step $1 selected by --only / --skip?
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$1,"* ]]; then return 1; fi
  if [ -n "$SKIP" ] && [[ ",$SKIP," == *",$1,"* ]]; then return 1; fi
  return 0
}

status() {  # name status rc seconds limit
  printf '{"step": "%s", "status": "%s", "rc": %s, "seconds": %s, "limit_s": %s}\n' "$1" "$2" "$3" "$4" "$5" \
    > "$OUT/status/$1.json"
}

# run_step NAME MAX_SECONDS COMMAND...: time-boxed to MAX_SECONDS or what is left of the budget.
FAILED=0
run_step() {
  local name=$1 max=$2
  shift 2
  [ "$name" = setup ] || wanted "$name" || return 0
  local left=$(( BUDGET - ($(date +%s) - START) - RESERVE ))
  local limit=$(( max < left ? max : left ))
  if [ "$limit" -lt 20 ]; then
    log "$name: skipped, ${left}s of the budget left"
    status "$name" skipped null 0 "$limit"
    return 0
  fi
  log "$name: start (limit ${limit}s)"
  local t0 rc state
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) state=ok ;;
    124|137) state=timeout ;;
    *) state=failed ;;
  esac
  [ "$state" = ok ] || FAILED=1
  status "$name" "$state" "$rc" "$(( $(date +%s) - t0 ))" "$limit"
  log "$name: $state (rc $rc, $(( $(date +%s) - t0 ))s); log: $OUT/$name.log"
}

# ---- setup -------------------------------------------------------------------------------------------

# Writes OUT/status/setup.env (PY=..., SITE=...) for the steps. Normal path: a venv with the image's
# site-packages visible and the wheels pip-installed into it. If the image's python3 cannot make such a
# venv (no ensurepip, or a base interpreter that is itself a venv, so its torch would be invisible),
# the wheels are unpacked into a directory on PYTHONPATH of the image's own interpreter instead: wheels
# are zip archives and nothing here needs their console scripts.
setup() {
  if [ "$DRY" = 1 ]; then
    echo "dry run: the current environment ($PY), no venv, no wheels"
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__)" || return 1
    printf 'PY=%q\nSITE=\n' "$PY" > "$OUT/status/setup.env"
    return 0
  fi
  local base site="" py
  base=$(command -v "${GPU_CHECK_BASE_PYTHON:-python3}") || { echo "no python3 on PATH"; return 1; }
  echo "base interpreter: $base ($("$base" --version 2>&1)); torch: $("$base" -c 'import torch; print(torch.__version__)' 2>&1)"
  py=$VENV/bin/python
  if "$base" -m venv --system-site-packages "$VENV" && "$py" -c "import torch" && "$py" -m pip --version >/dev/null; then
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
      # No dependency resolution: .whl/ holds exactly the closure the image lacks (tools/fetch_gpu_wheels.sh).
      "$py" -m pip install --no-index --no-deps --disable-pip-version-check "$WHEELS"/*.whl || return 1
    fi
    "$py" -m pip install --no-index --no-deps --no-build-isolation --disable-pip-version-check -e . \
      || echo "editable install failed; the steps use PYTHONPATH=$ROOT"
  else
    echo "no usable venv with the image's torch; unpacking the wheels for $base instead"
    py=$base
    site=${TMPDIR:-/tmp}/smp_gpu_site
    rm -rf "$site" && mkdir -p "$site"
    for whl in "$WHEELS"/*.whl; do
      [ -e "$whl" ] || continue
      "$base" -m zipfile -e "$whl" "$site" || return 1
    done
  fi
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "no wheels in $WHEELS: relying on the image's packages (tools/fetch_gpu_wheels.sh makes them)"
  fi
  printf 'PY=%q\nSITE=%q\n' "$py" "$site" > "$OUT/status/setup.env"
  PYTHONPATH="${site:+$site:}$PYTHONPATH" "$py" -c "import torch, smp_ros; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
}

if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-$ROOT/.venv/bin/python}
  DEV=cpu
  export TORCH_COMPILE_DISABLE=1 OMP_NUM_THREADS=1
else
  VENV=${GPU_CHECK_VENV:-${TMPDIR:-/tmp}/smp_gpu_venv}
  PY=""
  DEV=cuda
  export MUJOCO_GL=${MUJOCO_GL:-egl}
fi
WHEELS=${WHEEL_DIR:-$ROOT/.whl}
export DRY PY VENV OUT ROOT DEV WHEELS
export -f setup
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-43}

log "OUT=$OUT budget=${BUDGET}s dry_run=$DRY"
run_step setup 150 bash -c setup
if [ -f "$OUT/status/setup.env" ]; then
  # shellcheck disable=SC1091
  . "$OUT/status/setup.env"
  [ -z "$SITE" ] || export PYTHONPATH="$SITE:$PYTHONPATH"
else
  log "setup failed (see $OUT/setup.log); the steps run with the image's python3"
  PY=$(command -v python3)
fi
SMP=("$PY" -m smp_ros.cli)

# ---- steps -------------------------------------------------------------------------------------------

if [ "$DRY" = 1 ]; then
  SIM=tiny; PAPER=tiny
  BENCH_ITERS=(--warmup 0 --iters 2 --threads 1)
  TRAIN_BENCH=(--preset tiny --steps 2 --warmup 1 --batch-size 4 --threads 1)
  CPU_TESTS=(test/test_gpu_host_syncs.py)
else
  SIM=sim; PAPER=paper
  BENCH_ITERS=(--warmup 10 --iters 100)
  TRAIN_BENCH=(--preset sim paper --steps 20 --warmup 3)
  CPU_TESTS=(test/test_model_basis.py test/test_model_checkpoint.py test/test_model_encoder.py
             test/test_model_experts.py test/test_model_gates.py test/test_model_policy.py test/test_model_scheduler.py
             test/test_model_selection.py test/test_runtime_engine.py test/test_runtime_bench.py
             test/test_gpu_host_syncs.py test/test_gpu.py test/test_train_trainer.py test/test_config.py)
fi

run_step env 60 "$PY" tools/gpu_env.py "$OUT/env.json"
[ "$DRY" = 1 ] || nvidia-smi >> "$OUT/env.log" 2>&1

run_step pytest_gpu 180 "$PY" -m pytest -m gpu -v -rA -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" \
  test/test_gpu.py test/test_runtime_engine.py

BENCH=("${SMP[@]}" bench --device "$DEV" "${BENCH_ITERS[@]}")
run_step bench_sim_eager 90 "${BENCH[@]}" --preset "$SIM" --backend eager --json "$OUT/bench_sim_eager.json"
run_step bench_paper_eager 120 "${BENCH[@]}" --preset "$PAPER" --backend eager --json "$OUT/bench_paper_eager.json"
run_step train_bench 120 "${SMP[@]}" train-bench "${TRAIN_BENCH[@]}" --device "$DEV" --json "$OUT/train_bench.json"
run_step bench_sim_compiled 180 "${BENCH[@]}" --preset "$SIM" --backend compiled --json "$OUT/bench_sim_compiled.json"
run_step bench_paper_compiled 200 "${BENCH[@]}" --preset "$PAPER" --backend compiled \
  --json "$OUT/bench_paper_compiled.json"
run_step cpu_tests 150 "$PY" -m pytest -v -p no:cacheprovider --junitxml="$OUT/cpu_tests.xml" "${CPU_TESTS[@]}"

# The end-to-end run is worth starting only with time for all three of its phases.
E2E_MIN=$([ "$DRY" = 1 ] && echo 20 || echo 180)
if [ "$E2E" = 1 ] && wanted e2e; then
  if [ $(( BUDGET - ($(date +%s) - START) - RESERVE )) -ge "$E2E_MIN" ]; then
    run_step e2e 600 bash tools/gpu_e2e.sh "$PY" "$OUT/e2e"
  else
    log "e2e: skipped, less than ${E2E_MIN}s of the budget left"
    status e2e skipped null 0 0
  fi
fi

# ---- summary -----------------------------------------------------------------------------------------

"$PY" tools/gpu_check_summary.py "$OUT" || { echo "gpu_check: the summary failed" >&2; FAILED=1; }
log "done in $(( $(date +%s) - START ))s; $OUT/summary.md"
exit $FAILED
