#!/usr/bin/env bash
# Create or update the project's virtual environment from the pinned requirements, idempotently.
# Called by `make venv` (and so by `make demo` / `make test`); safe to run again at any time.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON=$candidate; break; fi
  done
fi
version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$version" in
  3.11|3.12) ;;
  *) echo "bootstrap: need Python 3.11 or 3.12 for the ROS 2 wheels; '$PYTHON' is $version" >&2; exit 1 ;;
esac

# System libraries for offscreen MuJoCo rendering (EGL, with OSMesa as the fallback) and the
# message build (cmake, g++). Installed only when missing.
need=()
for pkg in libegl1 libegl-mesa0 libgl1-mesa-dri libosmesa6 cmake g++; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "bootstrap: installing system packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

stamp_key=$(cat requirements.txt setup.py tools/bootstrap.sh $(ls msg/*.msg 2>/dev/null) | sha256sum | cut -c1-16)
stamp="$VENV/.smp_ros-$stamp_key"
if [ -f "$stamp" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip>=24" >/dev/null
"$VENV/bin/python" -m pip install -q -r requirements.txt
"$VENV/bin/python" -m pip install -q --no-deps -e .
if [ -x tools/build_msgs.sh ]; then
  tools/build_msgs.sh "$VENV"
fi
# What colcon installs, into the venv: lib/smp_ros executables (ros2 run), share/smp_ros launch,
# config and models (ros2 launch; the relative default model path).
"$VENV/bin/python" -m smp_ros.install --prefix "$VENV"
rm -f "$VENV"/.smp_ros-*
touch "$stamp"
echo "bootstrap: environment ready in $VENV"
