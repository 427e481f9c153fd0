"""The policy node frames live camera images as ingest framed the training images: a camera whose
frames have another size and aspect ratio than the model's ``data.image_size`` is fitted with the
model's ``data.image_fit`` (the function ingest uses), not stretched."""

import os
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from waiting import wait_for

pytestmark = pytest.mark.ros

os.environ.setdefault("ROS_DOMAIN_ID", str(20 + os.getpid() % 80))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

import rclpy  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402

from smp_ros.config import ACTION_DIM, EncoderConfig, preset  # noqa: E402
from smp_ros.data.bag_reader import fit_image  # noqa: E402  (what ingest applies to every recorded frame)
from smp_ros.model.checkpoint import save_model  # noqa: E402
from smp_ros.model.policy import build_policy  # noqa: E402
from smp_ros.msg import ArmStatus  # noqa: E402
from smp_ros.nodes.policy_node import PolicyNode  # noqa: E402
from smp_ros.nodes.ros_util import LATCHED_QOS, SENSOR_QOS, joint_state_msg  # noqa: E402
from ros_helpers import Spinning  # noqa: E402

CAMERA = "cam_high"
CAMERA_HW = (24, 64)  # what the camera publishes: wider than the model's square frames
NAMES = {arm: [f"{arm}_joint{i}" for i in range(1, 7)] + [f"{arm}_gripper"] for arm in ("left", "right")}


def frame() -> np.ndarray:
    """A test card: a horizontal ramp (so crop, pad and stretch all differ) with a bright centre block."""
    h, w = CAMERA_HW
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    img[..., 1] = np.linspace(255, 0, h, dtype=np.uint8)[:, None]
    img[8:16, 28:36, 2] = 255
    return img


def vision_model(tmp_path, fit: str):
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.model.encoder = EncoderConfig(mode="vision", cameras=(CAMERA,), image_size=(32, 32), backbone_width=8,
                                      group_norm_groups=4, proprio_hidden=32, task_embed_dim=8, state_dim=32)
    cfg.data = replace(cfg.data, image_size=(40, 40), image_fit=fit)  # what its ingest used
    policy = build_policy(cfg.model)
    lo, hi = [-1.0] * ACTION_DIM, [1.0] * ACTION_DIM
    policy.set_normalizer({"action": {"min": lo, "max": hi}, "qpos": {"min": lo, "max": hi}})
    return save_model(policy, cfg, tmp_path / f"vision_{fit}")


@pytest.mark.parametrize("fit", ["center_crop", "letterbox"])
def test_live_frames_are_fitted_as_ingest_fitted_the_training_frames(ros, tmp_path, fit):
    model = vision_model(tmp_path, fit)
    policy = PolicyNode(parameter_overrides=[
        Parameter(k, value=v) for k, v in {"model": str(model), "backend": "eager", "device": "cpu", "threads": 1,
                                           "camera_size": list(CAMERA_HW), "policy_rate_hz": 5.0,
                                           "inference_deadline_s": 3.0, "safety.stale_after_s": 1.0}.items()])
    robot = rclpy.create_node("fit_robot")
    joints = {a: robot.create_publisher(JointState, f"/{a}/joint_states", SENSOR_QOS) for a in NAMES}
    camera = robot.create_publisher(Image, f"/cameras/{CAMERA}/image_raw", SENSOR_QOS)
    status = {a: robot.create_publisher(ArmStatus, f"/{a}/arm_status", LATCHED_QOS) for a in NAMES}
    for arm, pub in status.items():
        pub.publish(ArmStatus(arm=arm, connected=True, enabled=True, state="running"))
    card = frame()
    msg = Image(height=CAMERA_HW[0], width=CAMERA_HW[1], encoding="rgb8", step=CAMERA_HW[1] * 3)
    msg.data = card.tobytes()
    spinning = Spinning(policy, robot)
    stop = threading.Event()

    def publish():
        i = 0
        while not stop.is_set():
            now = robot.get_clock().now()
            for arm, pub in joints.items():
                pub.publish(joint_state_msg(NAMES[arm], now.nanoseconds * 1e-9, np.zeros(7)))
            if i % 10 == 0:
                msg.header.stamp = now.to_msg()
                camera.publish(msg)
            i += 1
            time.sleep(0.005)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        wait_for(lambda: policy.runner is not None and policy.runner.stats.chunks >= 2, timeout=120.0,
                 what="chunks planned from the camera")
        seen = policy.runner.sync.latest().images[0]  # what the engine received for cam_high
    finally:
        stop.set()
        publisher.join()
        spinning.close()
    trained = fit_image(card, (40, 40), fit)
    np.testing.assert_array_equal(seen, trained)  # bit for bit the framing ingest gives
    assert not np.array_equal(seen, fit_image(card, (40, 40), "resize"))  # and not a stretch
    if fit == "letterbox":
        assert seen[:4].max() == 0 and seen[-4:].max() == 0  # 24x64 scaled to 15x40: black bars above and below
