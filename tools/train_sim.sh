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
# Environment: DEMOS (default runs/demos), DART (runs/demos_dart: the demonstrations recorded with
# --action-noise, one folder per task), OUT (models/smp_sim), THREADS (torch CPU threads; default all cores;
# 1 on a machine shared with other work), DEVICE (auto), DRY_RUN=1 (print the commands only).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMOS=${DEMOS:-runs/demos}
DART=${DART:-runs/demos_dart}
OUT=${OUT:-models/smp_sim}
SMP=${SMP:-.venv/bin/smp-ros}
run() { echo "+ $*"; [ -n "${DRY_RUN:-}" ] || "$@"; }

# set, task, episodes, first seed, --action-noise (rad): the demonstrations models/smp_sim was trained on,
# the plain ones in DEMOS and the DART ones (the arms executing the expert's targets plus noise) in DART/<task>
while read -r set task episodes seed noise; do
    dir=$DEMOS
    [ "$set" = dart ] && dir=$DART/$task
    marker="$dir/.recorded_${task}_$episodes"  # the count in the name: a folder of a smaller recipe is redone
    if [ -f "$marker" ]; then
        echo "demos: $task recorded ($marker)"
        continue
    fi
    run rm -rf "$dir"/"${task}"_*  # an interrupted recording of this task: start it over
    run "$SMP" sim-demos --task "$task" --episodes "$episodes" --out "$dir" --seed "$seed" --action-noise "$noise"
    run touch "$marker"
done <<'TASKS'
plain pen_cap 100 1000 0
plain cups_in_bowl 100 2000 0
plain handover 100 3000 0
plain pour_beans 104 4000 0
dart pen_cap 60 5000 0.03
dart cups_in_bowl 60 5000 0.03
dart handover 60 5000 0.03
dart pour_beans 60 5000 0.03
TASKS

run "$SMP" train --data "$DEMOS" "$DART/pen_cap" "$DART/cups_in_bowl" "$DART/handover" "$DART/pour_beans" \
    --preset sim --config config/train_sim.yaml --out "$OUT" --device "${DEVICE:-auto}" ${THREADS:+--threads "$THREADS"}
