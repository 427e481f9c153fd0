"""Environment report of the GPU check (tools/gpu_check.sh): versions, the device, and whether every
module the check needs imports and MuJoCo renders offscreen. Prints a summary and writes JSON.

    python tools/gpu_env.py OUT.json
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time

# What the GPU steps and their tests import (the wheels tools/fetch_gpu_wheels.sh brings, and the image's).
MODULES = ("torch", "torchvision", "numpy", "triton", "cv2", "safetensors", "tensorboard", "matplotlib", "yaml",
           "tqdm", "pytest", "hypothesis", "pytest_timeout", "mujoco", "rosbags", "piper_sdk", "can", "smp_ros",
           "smp_ros.runtime.engine", "smp_ros.train.trainer", "smp_ros.sim.world", "torch_tensorrt")
# Optional: the check reports their absence but does not fail on it.
OPTIONAL = {"torch_tensorrt", "triton"}

SCENE = """<mujoco><visual><quality offsamples="0"/></visual><worldbody><light pos="0 0 1"/>
<geom type="box" size=".1 .1 .1" rgba="1 0 0 1"/><camera name="c" pos="0 -0.5 0.2" xyaxes="1 0 0 0 0.4 1"/>
</worldbody></mujoco>"""


def main(path: str) -> int:
    # MuJoCo reads MUJOCO_GL once, at its first import: choose the backend as the simulator does, first.
    from smp_ros.sim.gl import select_backend

    gl = select_backend()
    report: dict = {"python": platform.python_version(), "executable": sys.executable, "mujoco_gl": gl,
                    "modules": {}}
    for name in MODULES:
        try:
            module = importlib.import_module(name)
            report["modules"][name] = getattr(module, "__version__", "ok")
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the report
            report["modules"][name] = f"ERROR {type(exc).__name__}: {exc}"
    import torch

    report["torch"] = torch.__version__
    report["cuda_available"] = torch.cuda.is_available()
    report["cuda"] = torch.version.cuda
    report["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    report["cpu_count"] = os.cpu_count()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        report["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                         "memory_GiB": round(props.total_memory / 2 ** 30, 1), "count": torch.cuda.device_count(),
                         "nccl": ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
                         "bf16": torch.cuda.is_bf16_supported()}
        x = torch.randn(256, 256, device="cuda")
        report["gpu"]["matmul_ok"] = bool(torch.isfinite(x @ x).all())
    report["render"] = _render()
    missing = [n for n, v in report["modules"].items() if str(v).startswith("ERROR") and n not in OPTIONAL]
    report["missing"] = missing
    for key in ("python", "torch", "cuda", "cudnn", "cuda_available", "gpu", "cpu_count", "mujoco_gl", "render"):
        print(f"{key:>15}: {report.get(key)}")
    for name, version in report["modules"].items():
        print(f"{'import ' + name:>30}: {version}")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1)
    if missing:
        print(f"missing modules: {missing}")
    return 1 if missing or not report["render"].startswith("ok") else 0


def _render() -> str:
    """One offscreen frame through the simulator's own GL selection."""
    try:
        import mujoco

        model = mujoco.MjModel.from_xml_string(SCENE)
        data = mujoco.MjData(model)
        mujoco.mj_forward(model, data)
        start = time.perf_counter()
        with mujoco.Renderer(model, 64, 64) as renderer:
            renderer.update_scene(data, camera="c")
            frame = renderer.render()
        ms = (time.perf_counter() - start) * 1e3
        return f"ok ({os.environ.get('MUJOCO_GL')}, {frame.shape}, max {int(frame.max())}, {ms:.0f} ms)"
    except Exception as exc:  # noqa: BLE001
        return f"ERROR {type(exc).__name__}: {exc}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "env.json"))
