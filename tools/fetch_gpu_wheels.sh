#!/usr/bin/env bash
# Download into .whl/ the wheels that a GPU machine's image lacks, for ITS Python (3.12, manylinux
# x86-64), so that `tools/gpu_check.sh` can install them there without a network.
#
# The GPU image is assumed to bring torch, torchvision, numpy, opencv-python-headless, safetensors,
# tensorboard, matplotlib, pytest, typing_extensions and packaging (BENCHMARKS.md, "GPU check"). These
# are NOT downloaded: torch's CUDA build alone is gigabytes, and the image's own torch is the one to
# measure. What the GPU steps and their tests import beyond that is downloaded here, at the versions
# pinned in requirements.txt, without dependency resolution (the list below is the closure):
#
#   mujoco, mujoco-core, glfw, PyOpenGL    simulator and EGL rendering (mujoco-studio, a viewer of
#                                          12 MB, is left out: the simulator does not import it)
#   rosbags, apsw, backports.zstd, lz4,    demonstration bags (data ingest, sim-demos)
#   ruamel.yaml
#   piper_sdk, python-can, wrapt           the arm driver the simulator talks to
#   PyYAML, tqdm                           config files, progress bars
#   hypothesis, sortedcontainers,          test dependencies
#   pytest-timeout
#
# The ROS 2 wheels are not carried (hundreds of MB): nothing in the GPU steps imports rclpy, and the
# ROS tests are not part of the check. The total must stay within the device call's carry limit.
#
# Usage: tools/fetch_gpu_wheels.sh            (env: WHEEL_DIR=.whl GPU_PYTHON_VERSION=3.12 LIMIT_MIB=64)
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${WHEEL_DIR:-.whl}
PY=${PYTHON:-.venv/bin/python}
PY_VERSION=${GPU_PYTHON_VERSION:-3.12}
LIMIT_MIB=${LIMIT_MIB:-64}
PACKAGES=(mujoco mujoco-core glfw PyOpenGL rosbags apsw backports.zstd lz4 ruamel.yaml piper_sdk python-can wrapt
          PyYAML tqdm hypothesis sortedcontainers pytest-timeout)

if [ ! -x "$PY" ]; then
  echo "fetch_gpu_wheels: no Python at $PY (run tools/bootstrap.sh, or set PYTHON)" >&2
  exit 1
fi

pins=()
for name in "${PACKAGES[@]}"; do
  # requirements.txt holds one NAME==VERSION per line; names compare case-insensitively and '-' == '_'.
  pattern=$(printf '%s' "$name" | sed 's/[-_.]/[-_.]/g')
  line=$(grep -iE "^${pattern}==" requirements.txt || true)
  if [ -z "$line" ]; then
    echo "fetch_gpu_wheels: $name is not pinned in requirements.txt; pin it there first" >&2
    exit 1
  fi
  pins+=("$line")
done

rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version "$PY_VERSION" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_28_x86_64 --dest "$DEST" "${pins[@]}" 2>&1 | grep -v "is ignored: it is neither" || true

missing=()
for name in "${PACKAGES[@]}"; do
  stem=$(printf '%s' "$name" | tr '[:upper:]-.' '[:lower:]__')
  ls "$DEST" | tr '[:upper:]' '[:lower:]' | grep -q "^${stem}-" || missing+=("$name")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "fetch_gpu_wheels: no Python $PY_VERSION manylinux x86-64 wheel downloaded for: ${missing[*]}" >&2
  exit 1
fi

bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
ls -l "$DEST"
printf 'fetch_gpu_wheels: %d wheels, %.1f MiB in %s (the tracked tree: %.1f MiB)\n' \
  "$(ls "$DEST"/*.whl | wc -l)" "$(echo "$bytes / 1048576" | bc -l)" "$DEST" "$(echo "$tree / 1048576" | bc -l)"
if [ "$bytes" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "fetch_gpu_wheels: over the ${LIMIT_MIB} MiB that a device call carries" >&2
  exit 1
fi
