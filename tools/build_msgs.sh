#!/usr/bin/env bash
# Generate the smp_ros messages and services (msg/, srv/) into a Python virtual environment that has
# the ROS 2 PyPI wheels, without a ROS install: plain CMake + g++ over the same CMakeLists.txt colcon
# uses. Afterwards `from smp_ros.msg import SkillState` works next to the editable smp_ros package.
#
#   tools/build_msgs.sh [VENV]          (default: .venv)
#
# The generated Python modules go to VENV/lib/smp_ros_interfaces/smp_ros, deliberately off sys.path:
# a second `smp_ros` directory on sys.path would shadow the editable source package. The source
# package's __init__.py adds that directory to its __path__. The C libraries go to VENV/lib, which the
# wheels' start-up hook already puts on the library path; an $ORIGIN rpath finds them as well.
# Idempotent: skips the build when the interface files and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

venv=$(cd "${1:-.venv}" && pwd)
python="$venv/bin/python"
[ -x "$python" ] || { echo "build_msgs: no Python at $python" >&2; exit 1; }

# The generators are not declared as dependencies by the wheels (requirements.txt pins them).
"$python" - <<'PY'
import importlib.util, sys
missing = [m for m in ("rosidl_generator_py", "rosidl_adapter", "rosidl_pycommon", "ament_package",
                       "catkin_pkg", "rosidl_cli", "em", "lark")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"build_msgs: the venv lacks {missing}; install requirements.txt first")
PY

build="$root/build/msgs"
generated="$venv/lib/smp_ros_interfaces"
stamp_key=$(cat CMakeLists.txt package.xml tools/build_msgs.sh msg/*.msg srv/*.srv | sha256sum | cut -c1-16)
stamp="$generated/.built-$stamp_key"
if [ -f "$stamp" ] && "$python" -c "from smp_ros.msg import SkillState; SkillState()" 2>/dev/null; then
  echo "build_msgs: up to date"
  exit 0
fi

mkdir -p "$build"
# The wheels' exported CMake targets carry include directories under /opt/python/... (the prefix
# they were built in), which does not exist here and makes CMake refuse the targets. Strip them
# from every imported target once configuration is finished.
cat > "$build/strip_wheel_includes.cmake" <<'CMAKE'
function(_smp_ros_strip_wheel_includes)
  get_property(_targets DIRECTORY "${CMAKE_SOURCE_DIR}" PROPERTY IMPORTED_TARGETS)
  foreach(_target ${_targets})
    get_target_property(_dirs ${_target} INTERFACE_INCLUDE_DIRECTORIES)
    if(_dirs)
      list(FILTER _dirs EXCLUDE REGEX "^/opt/python/")
      set_target_properties(${_target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_dirs}")
    endif()
  endforeach()
endfunction()
cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL _smp_ros_strip_wheel_includes)
CMAKE

export AMENT_PREFIX_PATH="$venv${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export CMAKE_PREFIX_PATH="$venv${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
cmake -S "$root" -B "$build" -Wno-dev --log-level=WARNING \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_INSTALL_PREFIX="$venv" \
  -DCMAKE_PROJECT_INCLUDE="$build/strip_wheel_includes.cmake" \
  -DPython3_EXECUTABLE="$python" \
  -DPYTHON_INSTALL_DIR=lib/smp_ros_interfaces \
  -DSMP_ROS_INSTALL_PYTHON=OFF \
  -DBUILD_TESTING=OFF \
  '-DCMAKE_INSTALL_RPATH=$ORIGIN;$ORIGIN/../..' >/dev/null
cmake --build "$build" --parallel "$(nproc)" >/dev/null
cmake --install "$build" >/dev/null

rm -f "$generated"/.built-*
touch "$stamp"
"$python" -c "from smp_ros.msg import SkillState; SkillState()"
echo "build_msgs: smp_ros interfaces installed into $venv"
