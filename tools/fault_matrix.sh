#!/usr/bin/env bash
# Inject every fault of the safety checklist into the running simulated system and print a table
# (smp_ros/nodes/fault_matrix.py). Arguments are passed on, e.g.:
#   tools/fault_matrix.sh --model models/smp_sim --json runs/fault_matrix.json
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${VENV:-.venv}/bin/smp-ros" fault-matrix "$@"
