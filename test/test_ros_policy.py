"""The policy node end to end: a tiny vision SMP trained here (a few dozen steps, quality not
asserted) drives the simulated arms over real topics; and the reasons to hold (stale camera, stale
joint state, missed inference deadline), each with a log that says why."""

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from waiting import wait_for
import torch

pytestmark = pytest.mark.ros

os.environ.setdefault("ROS_DOMAIN_ID", str(20 + os.getpid() % 80))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

import rclpy  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, QoSReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402

from smp_ros.config import COMMAND_CLOCKS, ConfigError, EncoderConfig, SafetyConfig, preset  # noqa: E402
from smp_ros.model import batch as keys  # noqa: E402
from smp_ros.model.checkpoint import save_model  # noqa: E402
from smp_ros.model.policy import build_policy  # noqa: E402
from smp_ros.msg import ArmStatus, PolicyStatus, SkillState  # noqa: E402
from smp_ros.nodes.policy_node import PolicyNode  # noqa: E402
from smp_ros.nodes.ros_util import LATCHED_QOS, SENSOR_QOS, joint_state_msg  # noqa: E402
from smp_ros.srv import SetTask  # noqa: E402
from ros_helpers import Spinning  # noqa: E402

HOME = np.array([0.0, 0.4, -0.6, 0.0, 0.5, 0.0, 0.035] * 2)
CAMERA = "cam_high"
NAMES = {arm: [f"{arm}_joint{i}" for i in range(1, 7)] + [f"{arm}_gripper"] for arm in ("left", "right")}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny one-camera SMP, trained for a few dozen steps on actions near the home pose."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.model.horizon = 16  # 0.8 s of plan at 20 Hz: chunks outlast slow inference on a busy machine
    cfg.model.encoder = EncoderConfig(mode="vision", cameras=(CAMERA,), image_size=(32, 32), backbone_width=8,
                                      group_norm_groups=4, proprio_hidden=32,
                                      task_embed_dim=8, state_dim=32)
    policy = build_policy(cfg.model)
    span = np.full(14, 0.2)
    stats = {"qpos": {"min": (HOME - span).tolist(), "max": (HOME + span).tolist()},
             "action": {"min": (HOME - span).tolist(), "max": (HOME + span).tolist()}}
    policy.set_normalizer(stats)
    m, L, T_o, H = 4, 2, cfg.model.obs_steps, cfg.model.horizon
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    policy.train()
    for step in range(24):
        qpos = HOME + rng.uniform(-0.1, 0.1, (m, L, T_o, 14))
        batch = {keys.QPOS: torch.tensor(qpos, dtype=torch.float32),
                 keys.IMAGES: torch.tensor(rng.integers(0, 255, (m, L, T_o, 1, 32, 32, 3)), dtype=torch.uint8),
                 keys.TASK: torch.tensor(rng.integers(0, 4, m)),
                 keys.ACTION: torch.tensor(qpos[:, :, -1:, :].repeat(H, axis=2), dtype=torch.float32)}
        loss = policy.compute_loss(batch, step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    return save_model(policy, cfg, tmp_path_factory.mktemp("tiny_vision_smp"))


def policy_params(model, **extra):
    # Generous staleness and deadline limits: this machine is shared and slow, and these tests are
    # about the behaviour, not about meeting real-time limits.
    values = {"model": str(model), "backend": "eager", "device": "cpu", "threads": 1,
              "command_rate_hz": 100.0, "policy_rate_hz": 5.0, "inference_deadline_s": 3.0,
              "safety.stale_after_s": 1.0, **extra}
    return [Parameter(k, value=v) for k, v in values.items()]


class Graph(Spinning):
    """The given nodes spinning, plus a probe node that records the policy's outputs."""

    def __init__(self, *nodes):
        self.probe = rclpy.create_node("policy_probe")
        self.cmds, self.skills, self.status = [], [], []
        # Every command, not the newest only (the node publishes reliable depth 1): a test that
        # looks at the first command after a restart must not read the second as the first.
        self.probe.create_subscription(JointState, "/left/joint_cmd", self.cmds.append,
                                       QoSProfile(depth=10_000, reliability=QoSReliabilityPolicy.RELIABLE))
        self.probe.create_subscription(SkillState, "/smp/skill_state", self.skills.append, 10)
        self.probe.create_subscription(PolicyStatus, "/smp/policy_status", self.status.append, LATCHED_QOS)
        super().__init__(*nodes, self.probe, num_threads=6)


@pytest.mark.sim
def test_policy_drives_the_simulated_arms(ros, tiny_model):
    from smp_ros.nodes.sim_node import SimNode

    sim = SimNode(parameter_overrides=[Parameter("sim.cameras", value=[CAMERA]),
                                       Parameter("sim.image_size", value=[32, 32])])
    # The simulator's thread shares this process: the model runs in a worker process, as the demo runs
    # it, so torch's per-operator GIL hand-overs do not wait behind the simulator (runtime/worker.py).
    policy = PolicyNode(parameter_overrides=policy_params(tiny_model, inference_process=True))
    graph = Graph(sim, policy)
    try:
        wait_for(lambda: len(graph.skills) >= 3 and len(graph.cmds) >= 100, timeout=180.0,
                 what="chunks and commands")
        # Causality, not rates (the machine may be busy): commands are stamped in order, and the
        # first command comes after the first chunk's observation.
        stamps = np.array([c.header.stamp.sec + 1e-9 * c.header.stamp.nanosec for c in graph.cmds])
        assert np.all(np.diff(stamps) > 0)
        first_chunk = graph.skills[0].header.stamp
        assert stamps[0] >= first_chunk.sec + 1e-9 * first_chunk.nanosec
        assert any(m.command_rate > 0 for m in graph.status) and any(m.inference_rate > 0 for m in graph.status)
        assert list(graph.cmds[-1].name) == NAMES["left"]
        assert np.all(np.isfinite(graph.cmds[-1].position))
        limits = SafetyConfig()
        q = np.array([c.position for c in graph.cmds])  # (N, 7)
        assert np.all(q[:, :6] >= np.array(limits.joint_lower) - 1e-9)
        assert np.all(q[:, :6] <= np.array(limits.joint_upper) + 1e-9)

        cfg = policy.engine.cfg  # K = 4 experts, at most k = 3 active
        for skill in graph.skills:
            active = list(skill.active_experts)
            assert 1 <= len(active) <= cfg.selection.k < cfg.num_experts
            assert active == sorted(set(active)) and all(0 <= i < cfg.num_experts for i in active)
            assert len(skill.gate) == cfg.num_experts and abs(sum(skill.gate) - 1.0) < 1e-4
            # S is the coverage selection on g_bar (mass m_i = g_i^2): the |S| largest gates, and the
            # smallest such set reaching tau_m unless the cap k stopped it.
            mass = np.square(np.array(skill.gate, dtype=np.float64))
            share = mass / mass.sum()
            order = np.argsort(-share)
            assert set(active) == set(order[:len(active)].tolist())
            assert np.isclose(skill.coverage, share[active].sum(), atol=1e-4)
            if len(active) < cfg.selection.k:
                assert skill.coverage >= skill.tau_m - 1e-5
            assert share[order[:len(active) - 1]].sum() < skill.tau_m + 1e-5
            assert skill.task == "pen_cap" and skill.task_id == 0 and skill.denoising_steps == 10
            assert skill.latency_denoise > 0 and skill.latency_total >= skill.latency_denoise
        assert [s.chunk_index for s in graph.skills] == list(range(1, len(graph.skills) + 1))

        # The task can change at run time; the next chunks are planned for it.
        client = graph.probe.create_client(SetTask, "/smp/set_task")
        assert client.wait_for_service(timeout_sec=10.0)
        bad = client.call_async(SetTask.Request(task="juggling"))
        wait_for(bad.done, what="set_task reply")
        assert not bad.result().success and "juggling" in bad.result().message
        good = client.call_async(SetTask.Request(task="handover"))
        wait_for(good.done, what="set_task reply")
        assert good.result().success
        wait_for(lambda: graph.skills[-1].task == "handover" and graph.skills[-1].task_id == 2,
                 what="a chunk for the new task")
    finally:
        graph.close()


class FakeRobot:
    """Publishes joint states (200 Hz) and camera frames (20 Hz) stamped now, like the drivers do;
    each stream can be stopped to make it stale."""

    def __init__(self):
        self.node = rclpy.create_node("fake_robot")
        self.joint_pubs = {a: self.node.create_publisher(JointState, f"/{a}/joint_states", SENSOR_QOS)
                           for a in ("left", "right")}
        self.image_pub = self.node.create_publisher(Image, f"/cameras/{CAMERA}/image_raw", SENSOR_QOS)
        self.status_pubs = {a: self.node.create_publisher(ArmStatus, f"/{a}/arm_status", LATCHED_QOS)
                            for a in ("left", "right")}
        self.live = {"left": True, "right": True, CAMERA: True}
        self.joints = {a: HOME[:7].copy() for a in ("left", "right")}  # what each arm reports
        self.names = dict(NAMES)
        self.frame = Image(height=32, width=32, encoding="rgb8", step=96)
        self.frame.data = np.full((32, 32, 3), 90, np.uint8).tobytes()
        for arm in ("left", "right"):
            self.arm_state(arm, "running")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def arm_state(self, arm, state, reason=""):
        """Publish the arm's latched ArmStatus as a driver would."""
        msg = ArmStatus(arm=arm, connected=state != "disconnected", enabled=state == "running",
                        emergency_stopped=state == "estopped", holding=state != "running", reason=reason,
                        state=state, awaiting_start=state == "awaiting_start")
        msg.header.stamp = self.node.get_clock().now().to_msg()
        self.status_pubs[arm].publish(msg)
        return msg.header.stamp.sec + 1e-9 * msg.header.stamp.nanosec

    def start(self):
        self._thread.start()

    def _run(self):
        i = 0
        while not self._stop.is_set():
            now = self.node.get_clock().now()
            t = now.nanoseconds * 1e-9
            for arm, pub in self.joint_pubs.items():
                if self.live[arm]:
                    pub.publish(joint_state_msg(self.names[arm], t, self.joints[arm]))
            if self.live[CAMERA] and i % 10 == 0:
                msg = self.frame
                msg.header.stamp = now.to_msg()
                self.image_pub.publish(msg)
            i += 1
            time.sleep(0.005)

    def close(self):
        self._stop.set()
        self._thread.join()


def _stamp(msg):
    return msg.header.stamp.sec + 1e-9 * msg.header.stamp.nanosec


def _holding_on(graph, text):
    return bool(graph.status) and graph.status[-1].holding and text in graph.status[-1].reason


def test_stale_streams_make_the_policy_hold(ros, tiny_model, capfd):
    robot = FakeRobot()
    policy = PolicyNode(parameter_overrides=policy_params(tiny_model))
    graph = Graph(policy, robot.node)
    robot.start()
    try:
        wait_for(lambda: len(graph.cmds) >= 20, what="commands from fresh observations")
        for stream, topic in ((CAMERA, f"/cameras/{CAMERA}/image_raw"), ("left", "/left/joint_states")):
            robot.live[stream] = False
            wait_for(lambda: _holding_on(graph, f"stale {topic}"), what=f"a hold on stale {topic}")
            # Causality, not a fixed wait: no command is stamped between the reported hold and the moment
            # the stream comes back (the node's status may report the recovery after its first command,
            # so the stream's own restart time bounds the window, on the same clock as the stamps).
            held_at = _stamp(graph.status[-1])
            count = len(graph.cmds)
            restored_at = robot.node.get_clock().now().nanoseconds * 1e-9
            robot.live[stream] = True
            wait_for(lambda: len(graph.cmds) > count + 10, what=f"commands after {topic} recovered")
            resumed = [_stamp(c) for c in graph.cmds[count:]]
            assert all(not held_at < t < restored_at for t in resumed), f"commands while {topic} was stale"
        log = capfd.readouterr().err
        assert f"HOLD: stale /cameras/{CAMERA}/image_raw" in log and "HOLD: stale /left/joint_states" in log
        assert "safety.stale_after_s" in log
        # The age in the reason changes every tick; the log line does not repeat with it.
        assert log.count(f"HOLD: stale /cameras/{CAMERA}/image_raw") < 5
    finally:
        robot.close()
        graph.close()


def _commands_resume(graph, count, what):
    wait_for(lambda: len(graph.cmds) > count + 10, timeout=60.0, what=what)


@pytest.mark.parametrize("phase", ["start-up", "mid-run"])
def test_bad_input_is_refused_and_held_on_without_a_crash(ros, tiny_model, capfd, phase):
    """Malformed and mismatched messages, at start-up and mid-run: refused at the subscription with
    an error naming the topic, a hold, no exception out of a callback, and commands once good
    input returns."""
    robot = FakeRobot()
    policy = PolicyNode(parameter_overrides=policy_params(tiny_model))
    graph = Graph(policy, robot.node)
    image_topic = f"/cameras/{CAMERA}/image_raw"
    big = Image(height=48, width=40, encoding="rgb8", step=120)  # well formed, another resolution
    big.data = np.zeros((48, 40, 3), np.uint8).tobytes()
    short_step = Image(height=32, width=32, encoding="rgb8", step=50)  # step < width * 3
    short_step.data = bytes(50 * 32)
    odd_encoding = Image(height=32, width=32, encoding="yuv422", step=64)
    odd_encoding.data = bytes(64 * 32)
    good_frame, good_joints = robot.frame, robot.joints["left"].copy()
    cases = [
        ("frame", big, image_topic, "40x48 image; expected 32x32"),
        ("frame", short_step, image_topic, "step"),
        ("frame", odd_encoding, image_topic, "yuv422"),
        ("joints", np.array([np.nan] + [0.4] * 6), "/left/joint_states", "non-finite"),
        ("joints", np.array([np.inf] + [0.4] * 6), "/left/joint_states", "non-finite"),
        ("names", None, "/right/joint_states", "missing joint"),
    ]
    try:
        if phase == "start-up":  # bad from the first message: never a command
            robot.frame, robot.joints["left"] = big, good_joints + np.nan
        robot.start()
        if phase == "start-up":
            wait_for(lambda: _holding_on(graph, "failing"), what="a hold on refused input at start-up")
            assert graph.cmds == []
            robot.frame, robot.joints["left"] = good_frame, good_joints
        _commands_resume(graph, 0, "commands from good input")
        for kind, bad, topic, text in cases:
            if kind == "frame":
                robot.frame = bad
            elif kind == "joints":
                robot.joints["left"] = bad
            else:
                robot.names["right"] = NAMES["left"]  # the right arm's states under the left's names
            wait_for(lambda: _holding_on(graph, topic) and text in graph.status[-1].reason,
                     what=f"a hold naming {topic} ({text})")
            count = len(graph.cmds)
            robot.frame, robot.joints["left"] = good_frame, good_joints
            robot.names["right"] = NAMES["right"]
            _commands_resume(graph, count, f"commands after good input returned on {topic}")
        assert graph.executor is not None and graph.thread.is_alive()  # the executor never died
        assert graph.status[-1].callback_errors >= len(cases)
        log = capfd.readouterr().err
        assert "refused" in log and image_topic in log and "/left/joint_states" in log
        assert "Traceback" not in log  # refused input is not a crash
    finally:
        robot.close()
        graph.close()


def test_arm_estop_holds_and_resumes_from_a_fresh_plan(ros, tiny_model):
    """The policy holds while an arm is e-stopped or awaiting start, and afterwards commands only
    from chunks planned after the arms run again: never from a stale chunk."""
    robot = FakeRobot()
    policy = PolicyNode(parameter_overrides=policy_params(tiny_model))
    graph = Graph(policy, robot.node)
    robot.start()
    try:
        _commands_resume(graph, 0, "commands")
        for state in ("estopped", "awaiting_start"):
            robot.arm_state("right", state, "test")
            wait_for(lambda: _holding_on(graph, f"right arm {state}"), what=f"a hold while {state}")
        held_at = _stamp(graph.status[-1])
        count = len(graph.cmds)
        # Meanwhile the left arm was moved by hand, 0.3 rad on joint 1: the restart must start from
        # where it is now, not from the last command (which the safety filter would otherwise
        # continue from, at most max_joint_step per tick), nor from a sample that was already
        # waiting when the arm ran again (no wait here for the policy to receive the new pose).
        robot.joints["left"] = HOME[:7] + np.array([0.3, 0, 0, 0, 0, 0, 0])
        resumed_at = robot.arm_state("right", "running")
        _commands_resume(graph, count, "commands after the arm runs again")
        after = graph.cmds[count:]
        assert all(_stamp(c) > resumed_at for c in after), "a command between the hold and the restart"
        step = SafetyConfig().max_joint_step
        assert abs(after[0].position[0] - 0.3) <= step + 1e-9, \
            f"first command after the restart at {after[0].position[0]:.3f} rad, measured 0.3 rad"
        assert held_at < resumed_at

        # A stop and a start reported back to back (faster than the node's ticks) still restart
        # the plan from the measured pose: the arm, moved again, is followed from 0.6 rad.
        robot.joints["left"] = HOME[:7] + np.array([0.6, 0, 0, 0, 0, 0, 0])
        robot.arm_state("right", "estopped", "test")
        resumed_at = robot.arm_state("right", "running")
        wait_for(lambda: any(_stamp(c) > resumed_at and abs(c.position[0] - 0.6) <= step + 1e-9
                             for c in graph.cmds[count:]), timeout=60.0,
                 what="commands restarted from the measured 0.6 rad after a brief stop")
    finally:
        robot.close()
        graph.close()


@pytest.mark.parametrize("command_clock", COMMAND_CLOCKS)
def test_deactivate_and_activate_mid_run_holds_then_resumes_from_the_measured_pose(ros, tiny_model, command_clock):
    """The policy node restarted through its lifecycle mid-run (what a supervisor does): no command
    while inactive, a status that says so, and on activation a fresh plan from where the arm is;
    with either command clock (its own thread, or a ROS timer)."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    robot = FakeRobot()
    policy = PolicyNode(parameter_overrides=policy_params(tiny_model, command_clock=command_clock))
    graph = Graph(policy, robot.node)
    client = graph.probe.create_client(ChangeState, "/smp/policy/change_state")
    robot.start()

    def transition(transition_id):
        assert client.wait_for_service(timeout_sec=30.0)
        future = client.call_async(ChangeState.Request(transition=Transition(id=transition_id)))
        wait_for(future.done, timeout=60.0, what=f"lifecycle transition {transition_id}")
        assert future.result().success
        return robot.node.get_clock().now().nanoseconds * 1e-9

    try:
        _commands_resume(graph, 0, "commands")
        deactivated_at = transition(Transition.TRANSITION_DEACTIVATE)
        wait_for(lambda: _holding_on(graph, "inactive"), what="a status saying the node is inactive")
        count = len(graph.cmds)
        # The arm is moved while the node is inactive; the node still hears it (0.3 rad, joint 1).
        robot.joints["left"] = HOME[:7] + np.array([0.3, 0, 0, 0, 0, 0, 0])
        wait_for(lambda: abs(policy.runner.sync.newest_joints("left")[1][0] - 0.3) < 1e-9,
                 what="the moved pose to arrive while inactive")
        assert all(_stamp(c) <= deactivated_at for c in graph.cmds), "a command while inactive"
        activated_at = transition(Transition.TRANSITION_ACTIVATE)
        _commands_resume(graph, count, "commands after activation")
        after = graph.cmds[count:]
        assert all(_stamp(c) > activated_at for c in after)
        step = SafetyConfig().max_joint_step
        assert abs(after[0].position[0] - 0.3) <= step + 1e-9, \
            f"first command after activation at {after[0].position[0]:.3f} rad, measured 0.3 rad"
    finally:
        robot.close()
        graph.close()


@pytest.mark.parametrize("command_clock", COMMAND_CLOCKS)
def test_command_periods_without_a_tick_are_counted_in_the_status(ros, tiny_model, command_clock):
    """On a simulated clock that stands still and then jumps 1 s (100 periods at 100 Hz), the command
    clock runs one late tick (and the one due at the new time) instead of a burst, and
    /smp/policy_status counts the 98 periods in which no tick started, with either command clock."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState
    from rosgraph_msgs.msg import Clock
    from smp_ros.nodes.ros_util import to_stamp
    from smp_ros.nodes.sim_node import CLOCK_QOS

    policy = PolicyNode(parameter_overrides=policy_params(tiny_model, command_clock=command_clock, autostart=False)
                        + [Parameter("use_sim_time", value=True)])
    graph = Graph(policy)
    clock_pub = graph.probe.create_publisher(Clock, "/clock", CLOCK_QOS)
    client = graph.probe.create_client(ChangeState, "/smp/policy/change_state")

    def set_clock(seconds):
        clock_pub.publish(Clock(clock=to_stamp(seconds)))
        wait_for(lambda: policy.get_clock().now().nanoseconds == round(seconds * 1e9), timeout=30.0,
                 what=f"the policy node's clock at {seconds} s")

    def transition(transition_id):
        assert client.wait_for_service(timeout_sec=30.0)
        future = client.call_async(ChangeState.Request(transition=Transition(id=transition_id)))
        wait_for(future.done, timeout=120.0, what=f"lifecycle transition {transition_id}")
        assert future.result().success

    try:
        set_clock(1.0)
        transition(Transition.TRANSITION_CONFIGURE)
        transition(Transition.TRANSITION_ACTIVATE)
        time.sleep(0.3)  # wall time passes, simulated time does not: no period elapses
        assert policy._skipped_command_periods() == 0
        set_clock(2.0)
        wait_for(lambda: graph.status and graph.status[-1].skipped_command_periods >= 98, timeout=60.0,
                 what="a status counting the skipped command periods")
        # Due in (1 s, 2 s]: 100 periods; run: the late one for 1.01 s and the one due at 2.00 s.
        assert graph.status[-1].skipped_command_periods in (98, 99, 100)
        wait_for(lambda: policy._command_ticks >= 1, timeout=30.0, what="the late tick")
        time.sleep(0.5)
        assert policy._command_ticks <= 2, f"a burst of {policy._command_ticks} ticks after the clock jumped"
        assert policy._skipped_command_periods() >= 98
    finally:
        graph.close()


def test_a_killed_inference_worker_is_restarted_while_the_node_holds(ros, tiny_model, capfd):
    import signal

    robot = FakeRobot()
    policy = PolicyNode(parameter_overrides=policy_params(tiny_model, inference_process=True))
    graph = Graph(policy, robot.node)
    robot.start()
    try:
        _commands_resume(graph, 0, "commands")
        pid = policy.engine.pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _holding_on(graph, "inference worker"), timeout=60.0, what="a hold naming the dead worker")
        assert "signal 9" in graph.status[-1].reason
        wait_for(lambda: graph.status[-1].worker_restarts >= 1, timeout=300.0, what="the worker restarted")
        assert policy.engine.pid != pid
        count = len(graph.cmds)
        _commands_resume(graph, count, "commands from the new worker")
        log = capfd.readouterr().err
        assert log.count("restarting it (attempt 1 of") == 1  # said once, not per planning cycle
        assert "Traceback" not in log
    finally:
        robot.close()
        graph.close()


def test_missed_inference_deadline_holds(ros, tiny_model, capfd):
    robot = FakeRobot()
    # A deadline no inference can meet, through the real parameter.
    policy = PolicyNode(parameter_overrides=policy_params(tiny_model, inference_deadline_s=1e-6))
    graph = Graph(policy, robot.node)
    robot.start()
    try:
        wait_for(lambda: _holding_on(graph, "deadline") and graph.status[-1].missed_deadlines >= 2,
                 what="a hold on missed deadlines")
        assert graph.cmds == [] and graph.skills == []
        log = capfd.readouterr().err
        assert "HOLD: inference missed its deadline" in log
        # One line per change of cause, not one per tick or per latency figure.
        assert log.count("HOLD: inference missed its deadline") < 5
    finally:
        robot.close()
        graph.close()


def test_a_rate_other_than_the_models_is_warned_about(ros, tiny_model, capfd):
    # The tiny model is saved with runtime.policy_rate_hz = 5 Hz.
    for rate, warned in ((10.0, True), (5.0, False)):
        policy = PolicyNode(parameter_overrides=policy_params(tiny_model, policy_rate_hz=rate, autostart=False))
        try:
            assert policy.trigger_configure() == TransitionCallbackReturn.SUCCESS
            log = capfd.readouterr().err
            assert ("parameter policy_rate_hz = 10 Hz" in log and "runtime.policy_rate_hz = 5 Hz" in log) == warned
        finally:
            policy.destroy_node()


def test_bad_parameters_are_named(ros):
    with pytest.raises(ConfigError, match="chunk_blend"):
        PolicyNode(parameter_overrides=[Parameter("chunk_blend", value="average")])
    with pytest.raises(ConfigError, match="tau_m"):
        PolicyNode(parameter_overrides=[Parameter("tau_m", value=1.5)])


@pytest.mark.slow
@pytest.mark.sim
def test_bringup_evaluates_episodes_and_writes_json(tiny_model, tmp_path):
    """`smp-ros bringup --sim --episodes` in its own process, closed loop over ROS topics."""
    import json
    import subprocess
    import sys

    import yaml

    config = yaml.safe_load(open("config/bimanual.yaml"))
    config["/smp/policy"]["ros__parameters"].update(
        {"model": str(tiny_model), "backend": "eager", "device": "cpu", "threads": 1, "policy_rate_hz": 5.0,
         "inference_deadline_s": 3.0})
    config["/**"]["ros__parameters"]["safety"]["stale_after_s"] = 1.0
    config["/sim"]["ros__parameters"]["sim"].update({"image_size": [32, 32], "cameras": [CAMERA],
                                                     "episode_steps": 40})
    path = tmp_path / "bimanual.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, "-m", "smp_ros.cli", "bringup", "--config", str(path), "--sim",
                             "--task", "handover", "--episodes", "2", "--json", str(out),
                             "--gate-trace", str(tmp_path / "traces")],
                            capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    task = report["tasks"]["handover"]
    assert [e["episode"] for e in task["episodes"]] == [2, 3]
    assert all(0.0 <= e["progress"] <= 1.0 and e["sim_time_s"] >= 2.0 for e in task["episodes"])
    assert task["inference_calls"] > 0 and task["latency_p50_s"] > 0
    # The summary keys every evaluation writes (smp_ros.results), the mean of the episodes' own.
    assert task["mean_progress"] == pytest.approx(sum(e["progress"] for e in task["episodes"]) / 2)
    assert task["success_rate"] == sum(e["success"] for e in task["episodes"]) / 2
    assert report["overall"]["episodes"] == 2 and report["overall"]["backend"] == "eager"
    trace = Path(task["episodes"][0]["gate_trace"])  # the first episode of each task is plotted
    assert trace == tmp_path / "traces" / "gate_trace_handover.png" and trace.stat().st_size > 10_000
    assert "gate_trace" not in task["episodes"][1]
