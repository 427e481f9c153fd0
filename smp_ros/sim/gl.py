"""Choose MuJoCo's offscreen OpenGL backend before ``mujoco`` is imported.

MuJoCo reads ``MUJOCO_GL`` once, when the module is first imported, so every module of the
simulator calls ``select_backend`` before its own ``import mujoco``. EGL (Mesa llvmpipe on a machine
without a GPU, the vendor driver on one with) is preferred; OSMesa is the fallback when no EGL
library is installed. A ``MUJOCO_GL`` already set by the user always wins.
"""

from __future__ import annotations

import ctypes.util
import os
import sys


def select_backend(preferred: str = "egl") -> str:
    """Set MUJOCO_GL (unless already set or mujoco already imported) and return the backend in use."""
    if "MUJOCO_GL" in os.environ:
        return os.environ["MUJOCO_GL"]
    if "mujoco" in sys.modules:
        # Too late to choose: mujoco picked its default (GLFW) on import, which needs a display.
        return "glfw"
    order = [preferred] + [b for b in ("egl", "osmesa") if b != preferred]
    libraries = {"egl": "EGL", "osmesa": "OSMesa"}
    for backend in order:
        if ctypes.util.find_library(libraries[backend]):
            os.environ["MUJOCO_GL"] = backend
            # PyOpenGL must agree with MuJoCo, or it loads GLX symbols and fails without a display.
            os.environ.setdefault("PYOPENGL_PLATFORM", backend)
            return backend
    raise RuntimeError("no offscreen OpenGL library found: install libegl1 + libgl1-mesa-dri (EGL) or "
                       "libosmesa6 (OSMesa), or set MUJOCO_GL")
