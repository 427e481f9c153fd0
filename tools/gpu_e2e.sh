#!/usr/bin/env bash
# The end-to-end step of tools/gpu_check.sh: the shipped model's recipe (README, config/train_sim.yaml)
# on a GPU machine, shortened to fit the check's time:
#   1. demonstrations: scripted experts in the simulator, one process per (task, shard) on every core
#   2. training: the `sim` preset with config/train_sim.yaml on the GPU, E2E_STEPS steps
#   3. evaluation: the trained model closed-loop in the simulator, one process per task, on the GPU
# Each phase's log is in OUTDIR; phases.jsonl has their times; the summary reads the rest.
#
#   tools/gpu_e2e.sh PYTHON OUTDIR     env: DRY=1 (CPU, one short episode, 2 steps), E2E_STEPS (1500),
#                                      E2E_SHARDS (4 per task), E2E_EPISODES (8 per shard), E2E_EVAL_EPISODES (5)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=$1
DIR=$2
rm -rf "$DIR"
mkdir -p "$DIR"

if [ "${DRY:-0}" = 1 ]; then
  TASKS=(pen_cap); SHARDS=1; EPISODES=1; STEPS=2; EVAL_EPISODES=1; DEVICE=cpu
  DEMO_ARGS=(--episode-steps 60 --no-only-success)  # a short episode need not succeed to be kept
  TRAIN_ARGS=(--threads 1)
else
  TASKS=(pen_cap cups_in_bowl handover pour_beans)
  SHARDS=${E2E_SHARDS:-4}; EPISODES=${E2E_EPISODES:-8}; STEPS=${E2E_STEPS:-1500}
  EVAL_EPISODES=${E2E_EVAL_EPISODES:-5}; DEVICE=cuda
  DEMO_ARGS=(); TRAIN_ARGS=()
fi
declare -A SEED=([pen_cap]=1000 [cups_in_bowl]=2000 [handover]=3000 [pour_beans]=4000)

phase() {  # name start_epoch rc
  printf '{"phase": "%s", "seconds": %s, "rc": %s}\n' "$1" "$(( $(date +%s) - $2 ))" "$3" >> "$DIR/phases.jsonl"
  echo "e2e: $1 rc=$3 in $(( $(date +%s) - $2 ))s"
}

# 1. demonstrations, in parallel (each process is single-threaded)
t0=$(date +%s)
pids=()
for task in "${TASKS[@]}"; do
  for ((k = 0; k < SHARDS; k++)); do
    OMP_NUM_THREADS=1 "$PY" -m smp_ros.cli sim-demos --task "$task" --episodes "$EPISODES" \
      --seed $(( ${SEED[$task]} + k * EPISODES )) --out "$DIR/demos" "${DEMO_ARGS[@]}" \
      > "$DIR/demos_${task}_$k.log" 2>&1 &
    pids+=($!)
  done
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
phase demos "$t0" "$rc"
echo "e2e: $(ls -d "$DIR"/demos/*/ 2>/dev/null | wc -l) bags in $DIR/demos"

# 2. training on the device
t0=$(date +%s)
"$PY" -m smp_ros.cli train --data "$DIR/demos" --preset sim --config config/train_sim.yaml --steps "$STEPS" \
  --device "$DEVICE" --out "$DIR/model" --no-progress "${TRAIN_ARGS[@]}" > "$DIR/train.log" 2>&1
rc=$?
phase train "$t0" "$rc"
[ "$rc" = 0 ] || { tail -20 "$DIR/train.log"; exit 1; }

# 3. closed-loop evaluation, one process per task
t0=$(date +%s)
pids=()
for task in "${TASKS[@]}"; do
  OMP_NUM_THREADS=2 "$PY" -m smp_ros.cli eval --policy "$DIR/model" --task "$task" --episodes "$EVAL_EPISODES" \
    --seed 100 --json "$DIR/eval_$task.json" > "$DIR/eval_$task.log" 2>&1 &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
phase eval "$t0" "$rc"
cat "$DIR"/eval_*.log | grep -E "^(task|pen_cap|cups_in_bowl|handover|pour_beans|all) " || true
exit "$rc"
