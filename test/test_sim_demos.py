"""Scripted demonstrations recorded as rosbag2: contents read back with rosbags and with rclpy."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from rosbags.interfaces import QosDurability, QosHistory, QosReliability

from smp_ros.config import SimConfig, TASKS
from smp_ros.data.errors import BagError

world_mod = pytest.importorskip("smp_ros.sim.world")
from smp_ros.sim import demos  # noqa: E402
from smp_ros.sim.evaluate import run_episode  # noqa: E402
from smp_ros.sim.scripted import ScriptedExpert  # noqa: E402
from smp_ros.data.bag_format import TYPESTORE, verify_bag  # noqa: E402

pytestmark = pytest.mark.sim

STEPS = 12  # 0.6 s of simulated time at 20 Hz
START_NS = 1_760_000_000 * 10**9
CAMERAS = ("cam_high", "cam_left_wrist", "cam_right_wrist")
JOINT_TOPICS = ("/left/joint_states", "/right/joint_states")
CMD_TOPICS = ("/left/joint_cmd", "/right/joint_cmd")


@pytest.fixture(scope="module", params=[("mcap", "piper"), ("sqlite3", "direct")], ids=lambda p: "-".join(p))
def recorded(request, tmp_path_factory):
    storage, backend = request.param
    cfg = replace(SimConfig(), episode_steps=STEPS)
    bag = tmp_path_factory.mktemp(storage) / "pen_cap_0007"
    with world_mod.BimanualWorld(cfg, "pen_cap", seed=7) as world:
        result = demos.record_episode(world, 7, bag, backend=backend, storage=storage, start_ns=START_NS)
    return bag, storage, backend, result


def read_all(bag):
    """{topic: [(log ns, msgtype, raw bytes, rosbags message)]} and the connections."""
    out = {}
    with AnyReader([bag], default_typestore=TYPESTORE) as reader:
        conns = {c.topic: c for c in reader.connections}
        for conn, log_ns, raw in reader.messages():
            out.setdefault(conn.topic, []).append((log_ns, conn.msgtype, raw, reader.deserialize(raw, conn.msgtype)))
    return out, conns


def stamp_ns(msg) -> int:
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


def test_bag_has_the_contract_topics_types_and_rates(recorded):
    bag, storage, backend, result = recorded
    assert (bag / f"{bag.name}.{'mcap' if storage == 'mcap' else 'db3'}").is_file()
    msgs, conns = read_all(bag)
    expected = {f"/cameras/{c}/image_raw": "sensor_msgs/msg/Image" for c in CAMERAS}
    expected |= {t: "sensor_msgs/msg/JointState" for t in JOINT_TOPICS + CMD_TOPICS}
    expected["/smp/task"] = "std_msgs/msg/String"
    expected["/smp/object_poses"] = "smp_ros/msg/ObjectPoses"
    assert {t: c.msgtype for t, c in conns.items()} == expected
    assert len(msgs["/smp/object_poses"]) == STEPS  # at the camera rate
    assert result.steps == STEPS
    for cam in CAMERAS:
        assert len(msgs[f"/cameras/{cam}/image_raw"]) == STEPS
    for topic in CMD_TOPICS:
        assert len(msgs[topic]) == STEPS
    # 200 Hz over the episode's STEPS / 20 Hz seconds, plus the reading the first command started from.
    for topic in JOINT_TOPICS:
        assert abs(len(msgs[topic]) - (STEPS / 20.0 * 200 + 1)) <= 2
        period = np.diff([stamp_ns(m[3]) for m in msgs[topic]]) / 1e9
        assert abs(np.median(period) - 0.005) < 0.0011 and period.max() < 0.0075
    assert [m[3].data for m in msgs["/smp/task"]] == ["pen_cap"]
    task_received = msgs["/smp/task"][0][0]
    for topic, items in msgs.items():
        if topic == "/smp/task":
            continue
        stamps = np.array([stamp_ns(m[3]) for m in items])
        assert np.all(np.diff(stamps) > 0), topic
        assert stamps[0] >= START_NS and stamps[-1] < START_NS + 10**9 * (STEPS / 20.0 + 0.5), topic
        delay = np.array([m[0] for m in items]) - stamps  # receive (log) time after the header stamp
        assert np.all(delay > 0) and np.all(delay < 10_000_000), topic
        assert stamps.min() >= task_received - 5_000_000, topic  # the task is announced at the start


def test_message_contents(recorded):
    bag, _, backend, result = recorded
    msgs, _ = read_all(bag)
    for side, topic in zip(("left", "right"), JOINT_TOPICS):
        for _, _, _, m in msgs[topic]:
            assert list(m.name) == [f"{side}_joint{i}" for i in range(1, 7)] + [f"{side}_gripper"]
            assert len(m.position) == len(m.velocity) == len(m.effort) == 7
            assert np.all(np.isfinite(m.position)) and 0.0 <= m.position[6] <= 0.07
        first_cmd = msgs[topic.replace("joint_states", "joint_cmd")][0][3]
        assert list(first_cmd.name) == list(m.name) and len(first_cmd.position) == 7
    if backend == "piper":
        # Readings come back through piper_sdk, whose joint angles are integers of 0.001 deg.
        q = np.array([m[3].position[:6] for m in msgs["/left/joint_states"]])
        millideg = np.degrees(q) * 1000
        np.testing.assert_allclose(millideg, np.round(millideg), atol=1e-6)
    for cam in CAMERAS:
        for _, _, _, img in msgs[f"/cameras/{cam}/image_raw"]:
            assert (img.height, img.width, img.encoding, img.step) == (128, 128, "rgb8", 384)
            assert img.data.size == 128 * 128 * 3 and img.is_bigendian == 0
        assert img.data.reshape(128, 128, 3).std() > 5.0
    info = json.loads((bag / "smp_episode.json").read_text())
    assert info["task"] == "pen_cap" and info["task_id"] == TASKS.index("pen_cap") and info["seed"] == 7
    assert info["success"] is False and info["steps"] == STEPS and info["control_rate_hz"] == 20.0
    assert info["backend"] == backend and info["start_time_ns"] == START_NS
    for key in ("expert", "left", "right"):
        assert len(info["phases"][key]) == STEPS
    assert info["phases"]["expert"][0] == info["phases"]["left"][0] == "left_approach"
    assert info["phases"]["right"][0] == "hold"
    assert len(info["stages"]) == STEPS and info["stages"][0] == 0
    # Object poses: the task's objects, named, in the world frame, stamped with the frame time.
    images = msgs["/cameras/cam_high/image_raw"]
    for (_, _, _, img), (_, _, _, m) in zip(images, msgs["/smp/object_poses"]):
        assert list(m.names) == ["pen", "cap"] and len(m.poses) == 2 and m.header.frame_id == "world"
        assert stamp_ns(m) == stamp_ns(img)
        pen = m.poses[0]
        assert 0.15 < pen.position.x < 0.3 and abs(np.linalg.norm(
            [pen.orientation.x, pen.orientation.y, pen.orientation.z, pen.orientation.w]) - 1) < 1e-6


def test_offered_qos_matches_rclpy_profiles(recorded):
    pytest.importorskip("rclpy")
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, ReliabilityPolicy, qos_profile_sensor_data
    bag = recorded[0]
    _, conns = read_all(bag)

    def as_rclpy(qos):
        return (HistoryPolicy(qos.history.value), qos.depth, ReliabilityPolicy(qos.reliability.value),
                DurabilityPolicy(qos.durability.value))

    sensor = qos_profile_sensor_data
    for topic, conn in conns.items():
        (qos,) = conn.ext.offered_qos_profiles
        got = as_rclpy(qos)
        if topic in JOINT_TOPICS or topic.startswith("/cameras/") or topic == "/smp/object_poses":
            assert got == (sensor.history, sensor.depth, sensor.reliability, sensor.durability), topic
        elif topic in CMD_TOPICS:
            assert got == (HistoryPolicy.KEEP_LAST, 1, ReliabilityPolicy.RELIABLE, DurabilityPolicy.VOLATILE)
        else:
            assert got == (HistoryPolicy.KEEP_LAST, 1, ReliabilityPolicy.RELIABLE, DurabilityPolicy.TRANSIENT_LOCAL)
    assert QosHistory.KEEP_LAST.value == HistoryPolicy.KEEP_LAST.value  # the enums share rmw's numbering
    assert QosReliability.BEST_EFFORT.value == ReliabilityPolicy.BEST_EFFORT.value
    assert QosDurability.TRANSIENT_LOCAL.value == DurabilityPolicy.TRANSIENT_LOCAL.value


@pytest.mark.ros
def test_every_message_deserialises_with_rclpy(recorded):
    pytest.importorskip("rclpy")
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String

    from smp_ros.msg import ObjectPoses
    classes = {"sensor_msgs/msg/Image": Image, "sensor_msgs/msg/JointState": JointState,
               "std_msgs/msg/String": String, "smp_ros/msg/ObjectPoses": ObjectPoses}
    msgs, _ = read_all(recorded[0])
    for topic, items in msgs.items():
        for _, msgtype, raw, ours in items:
            m = deserialize_message(bytes(raw), classes[msgtype])
            if msgtype == "sensor_msgs/msg/Image":
                assert m.encoding == "rgb8" and bytes(m.data) == ours.data.tobytes()
            elif msgtype == "sensor_msgs/msg/JointState":
                assert list(m.name) == list(ours.name)
                np.testing.assert_array_equal(m.position, ours.position)
                np.testing.assert_array_equal(m.effort, ours.effort)
                assert m.header.stamp.sec == ours.header.stamp.sec
                assert m.header.stamp.nanosec == ours.header.stamp.nanosec
            elif msgtype == "smp_ros/msg/ObjectPoses":  # the type hash rosbags stored matches the generated one
                assert list(m.names) == list(ours.names) and len(m.poses) == len(ours.poses)
                assert m.poses[0].orientation.w == ours.poses[0].orientation.w
            else:
                assert m.data == "pen_cap"


def test_truncated_bag_is_reported_naming_the_file(recorded, tmp_path):
    bag, storage, _, _ = recorded
    assert sum(verify_bag(bag).values()) > 0
    broken = tmp_path / bag.name
    shutil.copytree(bag, broken)
    (storage_file,) = [p for p in broken.iterdir() if p.suffix in (".mcap", ".db3")]
    data = storage_file.read_bytes()
    storage_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(BagError, match=storage_file.name):
        verify_bag(broken)


def test_episode_ends_a_settle_time_after_success():
    with world_mod.BimanualWorld(SimConfig(), "handover", seed=0) as world:
        result = run_episode(world, ScriptedExpert(world), seed=11, backend="direct", render=False, settle_s=0.5)
    assert result.success and result.steps < world.cfg.episode_steps
    assert result.sim_time == pytest.approx(result.steps / world.cfg.control_rate_hz, abs=1e-6)


def test_cli_drops_failed_episodes_and_refuses_to_overwrite(tmp_path, capsys):
    from smp_ros.cli import main
    out = tmp_path / "demos"
    argv = ["sim-demos", "--task", "cups_in_bowl", "--episodes", "2", "--seed", "3", "--out", str(out),
            "--backend", "direct", "--episode-steps", "3"]
    assert main(argv + ["--no-only-success"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cups_in_bowl_0003", "cups_in_bowl_0004"]
    assert json.loads((out / "cups_in_bowl_0003" / "smp_episode.json").read_text())["success"] is False
    capsys.readouterr()
    assert main(argv) == 2
    assert "cups_in_bowl_0003" in capsys.readouterr().err
    only = tmp_path / "only"
    assert main(["sim-demos", "--task", "cups_in_bowl", "--episodes", "2", "--out", str(only),
                 "--backend", "direct", "--episode-steps", "3"]) == 0
    assert not any(only.iterdir())  # 3 steps are too short to succeed: every episode is dropped
    assert "dropped 2 failed episode(s)" in capsys.readouterr().out


class _Constant:
    """An expert that always asks for the same targets: the noise alone moves the executed ones."""
    phase = "hold"
    arm_phases = {"left": "hold", "right": "hold"}

    def __init__(self, target):
        self.value = np.asarray(target, dtype=float)

    def reset(self, task):
        pass

    def act(self, obs):
        return self.value


def test_execution_noise_is_the_ornstein_uhlenbeck_process_it_claims():
    # Independent reference: the OU process dn = -n/tau dt + sigma sqrt(2/tau) dW has stationary
    # standard deviation sigma and autocorrelation exp(-lag/tau), whatever the step used to simulate it.
    noise, dt = demos.ActionNoise(sigma_rad=0.05, tau_s=0.4), 0.05
    target = np.linspace(-0.5, 0.5, 14)
    runs = []
    for seed in range(40):
        noisy = demos.NoisyExecution(_Constant(target), noise, dt, seed)
        noisy.reset("pen_cap")
        steps = np.array([noisy.act(None) for _ in range(400)])
        np.testing.assert_array_equal(noisy.target, target)  # the label is the expert's own target
        np.testing.assert_array_equal(steps[:, [6, 13]], np.tile(target[[6, 13]], (400, 1)))  # grippers: none
        runs.append(steps[:, demos.NoisyExecution.JOINTS] - target[demos.NoisyExecution.JOINTS])
    offsets = np.stack(runs)  # (seed, step, joint)
    assert offsets.std() == pytest.approx(0.05, rel=0.05)
    assert offsets[:, 0].std() == pytest.approx(0.05, rel=0.2)  # stationary from the first step
    for lag in (1, 4, 8):
        corr = np.mean(offsets[:, :-lag] * offsets[:, lag:]) / np.mean(offsets ** 2)
        assert corr == pytest.approx(np.exp(-lag * dt / 0.4), abs=0.03)
    again = demos.NoisyExecution(_Constant(target), noise, dt, 1)
    again.reset("pen_cap")
    joints = demos.NoisyExecution.JOINTS
    np.testing.assert_array_equal(again.act(None)[joints] - target[joints], runs[1][0])  # seeded per episode
    assert not np.allclose(runs[0][0], runs[1][0])


def test_noisy_demonstration_records_the_experts_targets_while_the_arms_wander(tmp_path):
    steps = 30  # 1.5 s of the first approach: no contact, so the expert's plan cannot depend on the noise
    cfg = replace(SimConfig(), episode_steps=steps)
    recorded = {}
    for sigma in (0.0, 0.03):
        bag = tmp_path / f"sigma_{sigma}"
        with world_mod.BimanualWorld(cfg, "pen_cap", seed=5) as world:
            demos.record_episode(world, 5, bag, backend="direct", render=False, start_ns=START_NS,
                                 noise=demos.ActionNoise(sigma_rad=sigma))
        msgs, _ = read_all(bag)
        recorded[sigma] = ({t: np.array([m[3].position for m in msgs[t]]) for t in JOINT_TOPICS + CMD_TOPICS},
                           json.loads((bag / "smp_episode.json").read_text()))
    (clean, clean_info), (noisy, noisy_info) = recorded[0.0], recorded[0.03]
    assert clean_info["action_noise"]["sigma_rad"] == 0.0 and noisy_info["action_noise"] == {"sigma_rad": 0.03,
                                                                                           "tau_s": 0.5}
    for cmd, states in zip(CMD_TOPICS, JOINT_TOPICS):
        np.testing.assert_allclose(noisy[cmd], clean[cmd], atol=1e-9)  # the labels: the expert's targets
        n = min(len(clean[states]), len(noisy[states]))
        apart = noisy[states][n // 4:n, :6] - clean[states][n // 4:n, :6]
        assert 0.01 < apart.std() < 0.06  # the arms executed the offsets (sigma 0.03, through the servo lag)
    assert np.ptp(clean["/left/joint_cmd"][:, :6], axis=0).max() > 0.05  # the left arm's approach has begun


def test_cli_refuses_bad_noise_naming_the_option(tmp_path, capsys):
    from smp_ros.cli import main
    base = ["sim-demos", "--task", "pen_cap", "--episodes", "1", "--out", str(tmp_path / "d"), "--backend", "direct",
            "--episode-steps", "2", "--no-render"]
    assert main(base + ["--action-noise", "-0.1"]) == 2
    assert "--action-noise" in capsys.readouterr().err
    assert main(base + ["--action-noise", "0.02", "--noise-tau-s", "0"]) == 2
    assert "--noise-tau-s" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
