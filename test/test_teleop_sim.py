"""Teleoperation end to end in simulation, the path a user with a PiPER leader/follower rig takes:

scripted demonstrator -> LEADER arms' CAN frames (sim_node ``teleop_source: scripted``) -> followers
obey them -> piper_sdk reads the leaders' frames -> ``leader_joint_states`` + ``joint_states`` +
cameras -> ``smp-ros record --teleop`` (RecorderNode) -> bag -> ingest with
``data.topics.action_source: leader`` -> a tiny model trains -> it loads and runs an episode in the
harness. The quick test records a few seconds; the slow one a whole episode, which the scripted
hands must solve through the leader arms alone, and trains a camera model."""

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from waiting import wait_for

pytestmark = [pytest.mark.ros, pytest.mark.sim]

os.environ.setdefault("ROS_DOMAIN_ID", str(20 + os.getpid() % 80))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

import rclpy  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rosbags.highlevel import AnyReader  # noqa: E402

from smp_ros.config import ARMS, SimConfig  # noqa: E402
from smp_ros.nodes.record import demonstration_topics  # noqa: E402
from ros_helpers import Spinning  # noqa: E402

TASK = "handover"
CAMERA = "cam_high"
LEADER = {arm: f"/{arm}/leader_joint_states" for arm in ARMS}


def record_teleop(bag: Path, *, sim_seconds: float | None, seed: int = 11) -> dict:
    """Run the simulator with scripted leaders and the recorder (as `smp-ros record --teleop` runs it)
    until ``sim_seconds`` of simulated time or, with None, until the episode is done. Returns the
    final episode status and the recorder's message counts."""
    from smp_ros.nodes.recorder_node import RecorderNode
    from smp_ros.nodes.sim_node import SimNode

    rclpy.init()
    recorder = None
    spinning = Spinning(num_threads=4, start=False)
    try:
        # The recorder first, as a user starts `ros2 bag record` before moving the leaders: the scripted
        # hands start with the simulator's first episode.
        recorder = spinning.add(RecorderNode(bag, demonstration_topics((CAMERA,), teleop=True), storage="mcap"))
        spinning.start()
        sim = SimNode(parameter_overrides=[
            Parameter("teleop_source", value="scripted"), Parameter("task", value=TASK), Parameter("seed", value=seed),
            Parameter("sim.cameras", value=[CAMERA]), Parameter("sim.image_size", value=[32, 32])])
        assert sim.teleop is not None
        spinning.add(sim)
        status = sim.episode_status
        if sim_seconds is None:
            wait_for(lambda: status().done, timeout=900.0, poll_s=0.1, what="the teleoperated episode to end")
        else:
            wait_for(lambda: status().sim_time >= sim_seconds, timeout=600.0, poll_s=0.05,
                     what=f"{sim_seconds} s of teleoperation")
        final = status()
        final = {"success": final.success, "progress": final.progress, "sim_time": final.sim_time}
    finally:
        spinning.stop()
        counts = recorder.close() if recorder is not None else {}
        spinning.close()
        rclpy.try_shutdown()
    return {**final, "counts": counts}


def read_joint_topics(bag: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """topic -> (header stamps (N,), positions (N, 7)) of every JointState topic in the bag."""
    out = {}
    with AnyReader([bag]) as reader:
        for conn in reader.connections:
            if conn.msgtype != "sensor_msgs/msg/JointState":
                continue
            stamps, positions = [], []
            for c, _, raw in reader.messages(connections=[conn]):
                msg = reader.deserialize(raw, c.msgtype)
                stamps.append(msg.header.stamp.sec + 1e-9 * msg.header.stamp.nanosec)
                positions.append(np.array(msg.position))
            out[conn.topic] = (np.array(stamps), np.array(positions).reshape(-1, 7))
    return out


def check_teleop_bag(bag: Path, counts: dict) -> dict:
    """What a real teleop rig's bag holds: leader and follower states of both arms, the camera, the
    task and object poses, and no commands (the leaders command the followers on the bus)."""
    for arm in ARMS:
        assert counts[LEADER[arm]] >= 20 and counts[f"/{arm}/joint_states"] >= 20, counts
        assert counts[f"/{arm}/joint_cmd"] == 0, counts
    assert counts[f"/cameras/{CAMERA}/image_raw"] >= 5 and counts["/smp/object_poses"] >= 5, counts
    joints = read_joint_topics(bag)
    for arm in ARMS:
        t_lead, q_lead = joints[LEADER[arm]]
        t_fol, q_fol = joints[f"/{arm}/joint_states"]
        assert np.all(np.diff(t_lead) >= 0) and np.all(np.isfinite(q_lead))
        # The follower tracks the leader: its state at each leader sample's time (a little later,
        # the follower lags by its firmware tick and servo) stays near the leader's target.
        lag = 0.1
        inside = (t_lead + lag >= t_fol[0]) & (t_lead + lag <= t_fol[-1])
        follow = np.stack([np.interp(t_lead[inside] + lag, t_fol, q_fol[:, j]) for j in range(6)], axis=1)
        error = np.abs(follow - q_lead[inside, :6])
        assert np.median(error) < 0.02 and np.percentile(error, 95) < 0.1, (arm, np.percentile(error, [50, 95, 100]))
    return joints


def ingest_and_train(bag_dir: Path, tmp_path: Path, preset: str, steps: int, camera: bool):
    """Ingest with action_source: leader and train; returns the model directory and the cache."""
    import yaml

    from smp_ros.data.cache import prepare_cache
    from smp_ros.train.trainer import TrainRequest, data_config_for, load_config, train

    # max_gap_s: a simulator that cannot keep real time on a busy machine leaves gaps in the streams
    # (it slows down rather than taking big steps); that is not what this test is about.
    overlay = {"data": {"topics": {"action_source": "leader", "action": dict(LEADER)}, "image_size": [32, 32],
                        "max_gap_s": 2.0}}
    if camera:
        overlay["model"] = {"encoder": {"mode": "vision", "cameras": [CAMERA], "image_size": [32, 32],
                                        "backbone_width": 8, "group_norm_groups": 4}}
    path = tmp_path / "teleop.yaml"
    path.write_text(yaml.safe_dump(overlay))
    cfg = load_config(preset, overlay=path, steps=steps)
    cfg.train.batch_size = 4
    cache = prepare_cache([bag_dir], data_config_for(cfg), cache_dir=tmp_path / "cache", workers=1, progress=False)
    train(cfg, TrainRequest(data=[str(bag_dir)], out=tmp_path / "model", device="cpu", progress=False,
                            cache_dir=tmp_path / "cache", diagnostics=False))
    return tmp_path / "model", cache


def _distance_to_path(points: np.ndarray, path: np.ndarray) -> np.ndarray:
    """Per point (N, d): the distance (max norm) to the polyline through ``path`` (M, d), i.e. to
    the nearest linear interpolation between two consecutive samples."""
    a, b = path[:-1], path[1:]  # segments (M-1, d)
    ab = b - a
    out = []
    for p in points:
        s = np.clip(np.einsum("md,md->m", p - a, ab) / np.maximum(np.einsum("md,md->m", ab, ab), 1e-18), 0, 1)
        out.append(np.min(np.abs(a + s[:, None] * ab - p).max(axis=1)))
    return np.array(out)


def check_actions_are_the_leaders(cache, joints: dict) -> None:
    """The ingested action at each control step is the leader's target in force then (align.py:
    linear interpolation of the leader stream at the step's time), not the follower's state."""
    ep = cache.episodes[0]
    actions = np.asarray(cache.action[ep.start:ep.start + ep.length])  # (T, 14)
    assert actions.shape[0] >= 10
    off_follower = 0.0
    for i, arm in enumerate(ARMS):
        rows = actions[:, 7 * i:7 * i + 7]
        on_leader = _distance_to_path(rows, joints[LEADER[arm]][1])
        assert on_leader.max() < 1e-5, (arm, on_leader.max())  # float32 rounding of the interpolation
        off_follower = max(off_follower, _distance_to_path(rows, joints[f"/{arm}/joint_states"][1]).max())
    assert off_follower > 1e-3, off_follower  # a moving follower lags its leader: another stream


def test_scripted_teleop_bag_trains_a_model_that_runs(tmp_path):
    from smp_ros.sim.evaluate import evaluate

    bag = tmp_path / "demos" / f"{TASK}_teleop"
    bag.parent.mkdir()
    result = record_teleop(bag, sim_seconds=3.0)
    joints = check_teleop_bag(bag, result["counts"])
    model, cache = ingest_and_train(bag.parent, tmp_path, "tiny", steps=2, camera=False)
    check_actions_are_the_leaders(cache, joints)
    report = evaluate(str(model), (TASK,), 1, seed=500, cfg=replace(SimConfig(), episode_steps=6),
                      backend="direct", render=False)
    ep = report["tasks"][TASK]["episodes"][0]
    assert ep["steps"] == 6 and ep["inferences"] >= 1


@pytest.mark.slow
def test_a_whole_teleoperated_episode_solves_the_task_and_trains_a_camera_model(tmp_path):
    from smp_ros.sim.evaluate import evaluate

    bag = tmp_path / "demos" / f"{TASK}_teleop"
    bag.parent.mkdir()
    started = time.monotonic()
    result = record_teleop(bag, sim_seconds=None)
    recorded = time.monotonic() - started
    # The scripted hands solve the task through the leader arms alone (nothing published joint_cmd).
    assert result["success"] and result["progress"] == 1.0, result
    joints = check_teleop_bag(bag, result["counts"])
    model, cache = ingest_and_train(bag.parent, tmp_path, "tiny", steps=20, camera=True)
    check_actions_are_the_leaders(cache, joints)
    report = evaluate(str(model), (TASK,), 1, seed=500,
                      cfg=replace(SimConfig(), episode_steps=20, cameras=(CAMERA,), image_size=(32, 32)),
                      backend="piper", render=True)
    ep = report["tasks"][TASK]["episodes"][0]
    assert ep["steps"] == 20 and ep["inferences"] >= 1
    print(f"teleop episode: {result['sim_time']:.1f} s simulated in {recorded:.0f} s wall; "
          f"counts {result['counts']}")


def test_leader_topics_continue_after_the_simulator_switches_task():
    """A task change rebuilds the world, whose emulated CAN clock starts again: the leaders' samples
    must still be published (and the new task's demonstrator drives them)."""
    from sensor_msgs.msg import JointState

    from smp_ros.nodes.ros_util import SENSOR_QOS
    from smp_ros.nodes.sim_node import SimNode

    rclpy.init()
    spinning = Spinning(num_threads=4, start=False)
    try:
        sim = spinning.add(SimNode(parameter_overrides=[
            Parameter("teleop_source", value="scripted"), Parameter("task", value=TASK),
            Parameter("sim.cameras", value=[CAMERA]), Parameter("sim.image_size", value=[32, 32])]))
        probe = spinning.add(rclpy.create_node("leader_probe"))
        got: list = []
        probe.create_subscription(JointState, LEADER["right"], got.append, SENSOR_QOS)
        spinning.start()
        wait_for(lambda: len(got) >= 20 and sim.emulators["right"].time > 3.0, timeout=120.0,
                 what="3 s of leader samples before the switch")
        old_clock = sim.arms["right"].leader_targets()[0]
        episode, _ = sim.reset_episode("cups_in_bowl", 5)
        assert sim.task == "cups_in_bowl" and sim.teleop.world.task.name == "cups_in_bowl"
        count = len(got)
        wait_for(lambda: len(got) >= count + 20, timeout=120.0, what="leader samples after the switch")
        # They resumed at once, not only once the new world's clock passed the old one's.
        assert sim.emulators["right"].time < old_clock, (sim.emulators["right"].time, old_clock)
        stamps = [m.header.stamp.sec + 1e-9 * m.header.stamp.nanosec for m in got]
        assert stamps == sorted(stamps)  # ROS stamps stay in order although the CAN clock restarted
    finally:
        spinning.close()
        rclpy.try_shutdown()
