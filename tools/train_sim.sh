#!/usr/bin/env bash
# The shipped simulation model's recipe (models/smp_sim) as one command that continues where it stopped:
#
#   make train-sim            # or: tools/train_sim.sh
#
# Run it again after an interruption (Ctrl-C, a reboot, a killed process) and it picks up where it
# was: a task whose demonstrations were all recorded is not recorded again (a marker file says so; an
# interrupted task's bags are removed and that task is recorded afresh, same seeds, same bags), and
# `smp-ros train` resumes from models/smp_sim.train/state.pt (at most train.checkpoint_every steps
# are repeated; the resumed run equals an uninterrupted one). A finished run is reported and left alone.
#
# Environment: DEMOS (default runs/demos), OUT (models/smp_sim), THREADS (torch CPU threads; default
# all cores; 1 on a machine shared with other work), DEVICE (auto), DRY_RUN=1 (print the commands only).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMOS=${DEMOS:-runs/demos}
OUT=${OUT:-models/smp_sim}
SMP=${SMP:-.venv/bin/smp-ros}
run() { echo "+ $*"; [ -n "${DRY_RUN:-}" ] || "$@"; }

# task, episodes, first seed: the demonstrations models/smp_sim was trained on
while read -r task episodes seed; do
    marker="$DEMOS/.recorded_${task}_$episodes"  # the count in the name: a folder of a smaller recipe is redone
    if [ -f "$marker" ]; then
        echo "demos: $task recorded ($marker)"
        continue
    fi
    run rm -rf "$DEMOS"/"${task}"_*  # an interrupted recording of this task: start it over
    run "$SMP" sim-demos --task "$task" --episodes "$episodes" --out "$DEMOS" --seed "$seed"
    run touch "$marker"
done <<'TASKS'
pen_cap 100 1000
cups_in_bowl 100 2000
handover 100 3000
pour_beans 104 4000
TASKS

run "$SMP" train --data "$DEMOS" --preset sim --config config/train_sim.yaml --out "$OUT" \
    --device "${DEVICE:-auto}" ${THREADS:+--threads "$THREADS"}
