"""The policy node with an object-pose model (the state track): it reads ``/smp/object_poses`` beside
the joint states, runs the simulated arms through real topics, and holds, naming the topic, when the
pose stream is missing, stale or malformed. A tiny object-pose SMP is trained here on synthetic
batches (a few steps; quality is not asserted)."""

import os
import threading
import time

import numpy as np
import pytest
import torch
from waiting import wait_for

pytestmark = pytest.mark.ros

os.environ.setdefault("ROS_DOMAIN_ID", str(20 + os.getpid() % 80))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

import rclpy  # noqa: E402
from geometry_msgs.msg import Pose  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402

from smp_ros.config import OBJECT_SLOTS, TASK_OBJECTS, preset  # noqa: E402
from smp_ros.model import batch as keys  # noqa: E402
from smp_ros.model.checkpoint import save_model  # noqa: E402
from smp_ros.model.objects import object_vector  # noqa: E402
from smp_ros.model.policy import build_policy  # noqa: E402
from smp_ros.msg import ArmStatus, ObjectPoses, PolicyStatus, SkillState  # noqa: E402
from smp_ros.nodes.policy_node import PolicyNode  # noqa: E402
from smp_ros.nodes.ros_util import COMMAND_QOS, LATCHED_QOS, SENSOR_QOS, joint_state_msg  # noqa: E402
from ros_helpers import Spinning  # noqa: E402

HOME = np.array([0.0, 0.4, -0.6, 0.0, 0.5, 0.0, 0.035] * 2)
NAMES = {arm: [f"{arm}_joint{i}" for i in range(1, 7)] + [f"{arm}_gripper"] for arm in ("left", "right")}
TASK = "handover"  # one tracked object ("tool"), two padded slots
TOPIC = "/smp/object_poses"


@pytest.fixture(scope="module")
def pose_model(tmp_path_factory):
    """A tiny low-dimensional SMP that reads joint states + object poses + task."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.model.horizon = 16  # chunks outlast slow inference on a busy machine
    cfg.model.encoder.object_slots = OBJECT_SLOTS
    cfg.data.object_slots = OBJECT_SLOTS
    policy = build_policy(cfg.model)
    span = np.full(14, 0.2)
    n_obj = OBJECT_SLOTS * 7
    policy.set_normalizer({"qpos": {"min": (HOME - span).tolist(), "max": (HOME + span).tolist()},
                           "action": {"min": (HOME - span).tolist(), "max": (HOME + span).tolist()},
                           "objects": {"min": [-1.0] * n_obj, "max": [1.0] * n_obj}})
    m, L, T_o, H = 4, 2, cfg.model.obs_steps, cfg.model.horizon
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    policy.train()
    for step in range(16):
        qpos = HOME + rng.uniform(-0.1, 0.1, (m, L, T_o, 14))
        batch = {keys.QPOS: torch.tensor(qpos, dtype=torch.float32),
                 keys.OBJECTS: torch.tensor(rng.uniform(-0.5, 0.5, (m, L, T_o, n_obj)), dtype=torch.float32),
                 keys.TASK: torch.tensor(rng.integers(0, 4, m)),
                 keys.ACTION: torch.tensor(qpos[:, :, -1:, :].repeat(H, axis=2), dtype=torch.float32)}
        loss = policy.compute_loss(batch, step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    return save_model(policy, cfg, tmp_path_factory.mktemp("tiny_pose_smp"))


def policy_params(model, **extra):
    # Generous limits: the machine is shared; these tests are about behaviour, not real-time limits.
    values = {"model": str(model), "backend": "eager", "device": "cpu", "threads": 1, "task": TASK,
              "command_rate_hz": 100.0, "policy_rate_hz": 5.0, "inference_deadline_s": 3.0,
              "safety.stale_after_s": 1.0, **extra}
    return [Parameter(k, value=v) for k, v in values.items()]


class Graph(Spinning):
    """The given nodes spinning, plus a probe recording the policy's outputs."""

    def __init__(self, *nodes):
        self.probe = rclpy.create_node("pose_policy_probe")
        self.cmds, self.skills, self.status = [], [], []
        self.probe.create_subscription(JointState, "/left/joint_cmd", self.cmds.append, COMMAND_QOS)
        self.probe.create_subscription(SkillState, "/smp/skill_state", self.skills.append, 10)
        self.probe.create_subscription(PolicyStatus, "/smp/policy_status", self.status.append, LATCHED_QOS)
        super().__init__(*nodes, self.probe, num_threads=6)

    def holding_on(self, *texts):
        return bool(self.status) and self.status[-1].holding and all(t in self.status[-1].reason for t in texts)


@pytest.mark.sim
def test_policy_runs_the_simulated_arms_on_object_poses(ros, pose_model):
    from smp_ros.nodes.sim_node import SimNode

    sim = SimNode(parameter_overrides=[Parameter("task", value=TASK), Parameter("sim.cameras", value=["cam_high"]),
                                       Parameter("sim.image_size", value=[32, 32])])
    policy = PolicyNode(parameter_overrides=policy_params(pose_model))
    graph = Graph(sim, policy)
    try:
        wait_for(lambda: len(graph.skills) >= 3 and len(graph.cmds) >= 50, timeout=180.0,
                 what="chunks and commands from a model reading object poses")
        assert policy.runner.sync.objects and policy.runner.sync.labels["objects"] == TOPIC
        # What the model was given is the simulator's tool pose in the task's first slot, zeros after it.
        snap = policy.runner.sync.latest()
        assert snap.objects.shape == (OBJECT_SLOTS * 7,)
        names, poses = sim.world.object_poses()
        expected = object_vector(TASK, names, poses, TASK_OBJECTS, OBJECT_SLOTS)
        np.testing.assert_allclose(snap.objects[:3], expected[:3], atol=0.05)  # the tool barely moves
        np.testing.assert_array_equal(snap.objects[7:], 0.0)
        # No camera was subscribed: a state model makes the simulator render nothing.
        assert sim.image_pubs["cam_high"].get_subscription_count() == 0
        assert all(s.task == TASK for s in graph.skills)
    finally:
        graph.close()


class PoseRobot:
    """Joint states (200 Hz), arm statuses and object poses (20 Hz) stamped now, as drivers and a
    tracker publish them; ``poses`` is what the tracker reports (None: it stopped)."""

    def __init__(self):
        self.node = rclpy.create_node("pose_robot")
        self.joint_pubs = {a: self.node.create_publisher(JointState, f"/{a}/joint_states", SENSOR_QOS)
                           for a in ("left", "right")}
        self.pose_pub = self.node.create_publisher(ObjectPoses, TOPIC, SENSOR_QOS)
        self.status_pubs = {a: self.node.create_publisher(ArmStatus, f"/{a}/arm_status", LATCHED_QOS)
                            for a in ("left", "right")}
        for arm, pub in self.status_pubs.items():
            pub.publish(ArmStatus(arm=arm, connected=True, enabled=True, state="running"))
        self.poses: dict[str, tuple] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        i = 0
        while not self._stop.is_set():
            now = self.node.get_clock().now()
            for arm, pub in self.joint_pubs.items():
                pub.publish(joint_state_msg(NAMES[arm], now.nanoseconds * 1e-9, HOME[:7]))
            poses = self.poses
            if poses is not None and i % 10 == 0:
                msg = ObjectPoses(names=list(poses))
                msg.header.stamp = now.to_msg()
                for x, y, z, qx, qy, qz, qw in poses.values():
                    p = Pose()
                    p.position.x, p.position.y, p.position.z = x, y, z
                    p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w = qx, qy, qz, qw
                    msg.poses.append(p)
                self.pose_pub.publish(msg)
            i += 1
            time.sleep(0.005)

    def close(self):
        self._stop.set()
        self._thread.join()


def test_missing_stale_or_bad_object_poses_hold_naming_the_topic(ros, pose_model, capfd):
    good = {"tool": (0.3, 0.0, 0.05, 0.0, 0.0, 0.0, 1.0), "bowl": (0.0, 0.2, 0.0, 0.0, 0.0, 0.0, 1.0)}
    robot = PoseRobot()
    policy = PolicyNode(parameter_overrides=policy_params(pose_model))
    graph = Graph(policy, robot.node)
    try:
        # Joint states flow, but no tracker has spoken: a hold naming the pose topic, no command.
        wait_for(lambda: graph.holding_on(f"no sample yet on {TOPIC}"), timeout=120.0,
                 what="a hold for the missing pose stream")
        assert graph.cmds == []
        robot.poses = good
        wait_for(lambda: len(graph.cmds) >= 10, timeout=120.0, what="commands once poses arrive")
        cases = [({"bowl": good["bowl"]}, "object 'tool' of task 'handover' is missing"),
                 ({"tool": (np.nan, 0.0, 0.05, 0.0, 0.0, 0.0, 1.0)}, "non-finite object pose"),
                 ({"tool": (0.3, 0.0, 0.05, 0.0, 0.0, 0.0, 0.0)}, "zero-length orientation"),
                 (None, f"stale {TOPIC}")]
        for poses, text in cases:
            robot.poses = poses
            wait_for(lambda: graph.holding_on(TOPIC, text), timeout=60.0, what=f"a hold naming {TOPIC} ({text})")
            count = len(graph.cmds)
            robot.poses = good
            wait_for(lambda: len(graph.cmds) > count + 10, timeout=60.0, what=f"commands after {text!r}")
        assert graph.thread.is_alive()
        log = capfd.readouterr().err
        assert "Traceback" not in log and f"stale {TOPIC}" in log
    finally:
        robot.close()
        graph.close()


@pytest.mark.slow
@pytest.mark.sim
def test_bringup_runs_episodes_with_an_object_pose_model(pose_model, tmp_path):
    """`smp-ros bringup --sim --model <object-pose model> --episodes 1` in its own process."""
    import json
    import subprocess
    import sys

    import yaml

    config = yaml.safe_load(open("config/bimanual.yaml"))
    config["/smp/policy"]["ros__parameters"].update(
        {"backend": "eager", "device": "cpu", "threads": 1, "policy_rate_hz": 5.0, "inference_deadline_s": 3.0})
    config["/**"]["ros__parameters"]["safety"]["stale_after_s"] = 1.0
    config["/sim"]["ros__parameters"]["sim"].update({"image_size": [32, 32], "episode_steps": 40})
    path = tmp_path / "bimanual.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, "-m", "smp_ros.cli", "bringup", "--config", str(path), "--sim",
                             "--model", str(pose_model), "--task", TASK, "--episodes", "1", "--json", str(out)],
                            capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"object poses on {TOPIC}" in result.stderr
    task = json.loads(out.read_text())["tasks"][TASK]
    assert task["episodes"][0]["sim_time_s"] >= 2.0 and task["inference_calls"] > 0
