"""The PiPER driver node on an emulated arm: real rclpy topics and services, the real piper_sdk over
python-can's virtual bus, and the CAN-level firmware emulator driving a first-order plant."""

import math
import os
import threading
import time

import numpy as np
import pytest
from waiting import wait_for

pytestmark = pytest.mark.ros

os.environ.setdefault("ROS_DOMAIN_ID", str(20 + os.getpid() % 80))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

import rclpy  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from smp_ros.config import ConfigError  # noqa: E402
from smp_ros.hardware.piper import PiperArm  # noqa: E402
from smp_ros.msg import ArmStatus  # noqa: E402
from smp_ros.nodes.driver_node import DriverNode  # noqa: E402
from smp_ros.nodes.ros_util import COMMAND_QOS, LATCHED_QOS, SENSOR_QOS  # noqa: E402
from smp_ros.sim.can_emulator import FirstOrderArmPlant, PiperCanEmulator  # noqa: E402
from ros_helpers import Spinning  # noqa: E402

NAMES = [f"left_joint{i}" for i in range(1, 7)] + ["left_gripper"]
HOME = np.array([0.0, 0.5, -0.5, 0.0, 0.0, 0.0])
TARGET = HOME + np.array([0.2, 0.1, -0.1, 0.0, 0.1, -0.2])


class EmulatedArm:
    """Plant + firmware emulator advanced in (approximately) real time by a background thread."""

    def __init__(self, channel: str):
        self.plant = FirstOrderArmPlant(q0=HOME, gripper0=0.01)
        self.emu = PiperCanEmulator(self.plant, channel, feedback_rate_hz=200.0, side="left")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        dt, start = 0.002, time.monotonic()
        while not self._stop.is_set():
            while self.emu.time < time.monotonic() - start:
                self.plant.step(dt)
                self.emu.advance(dt)
            time.sleep(0.001)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.emu.close()


class Probe:
    """The test's side of the graph: what a policy and an operator would use."""

    def __init__(self, node):
        self.node = node
        self.states: list[JointState] = []
        self.status: ArmStatus | None = None
        node.create_subscription(JointState, "/left/joint_states", self.states.append, SENSOR_QOS)
        node.create_subscription(ArmStatus, "/left/arm_status", self._on_status, LATCHED_QOS)
        self.cmd = node.create_publisher(JointState, "/left/joint_cmd", COMMAND_QOS)
        self.clients = {n: node.create_client(Trigger, f"/left/{n}")
                        for n in ("enable", "disable", "emergency_stop", "reset", "start")}

    def _on_status(self, msg):
        self.status = msg

    def call(self, name: str) -> Trigger.Response:
        client = self.clients[name]
        assert client.wait_for_service(timeout_sec=10.0), f"/left/{name} not offered"
        future = client.call_async(Trigger.Request())
        deadline = time.monotonic() + 10.0
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert future.done(), f"/left/{name} did not answer"
        return future.result()

    def send(self, position):
        msg = JointState(name=NAMES, position=[float(v) for v in position])
        self.cmd.publish(msg)

    def latest(self) -> np.ndarray:
        return np.array(self.states[-1].position)


@pytest.fixture(scope="module")
def system():
    rclpy.init()
    arm_sim = EmulatedArm(f"driver_test_{os.getpid()}")
    arm = PiperArm(arm_sim.emu.channel, "left", bustype="virtual", clock=lambda: arm_sim.emu.time)
    driver = DriverNode(arm=arm, namespace="/left",
                        parameter_overrides=[Parameter("command_rate_hz", value=200.0),
                                             # generous: a busy machine delays feedback and enabling
                                             Parameter("enable_timeout_s", value=10.0)])
    probe_node = rclpy.create_node("driver_probe")
    probe = Probe(probe_node)
    spinning = Spinning(driver, probe_node)
    try:
        wait_for(lambda: probe.status is not None and probe.status.enabled, what="the arm to report enabled")
        yield probe, arm_sim, driver
    finally:
        spinning.close()
        arm_sim.close()
        rclpy.try_shutdown()


@pytest.fixture(autouse=True)
def running_arm(system):
    """Each test starts from one defined state, whatever the test before it left (an e-stop, a
    disabled arm, an arm awaiting start, another owner): the driver's own services reset, enable and
    start the arm (each must succeed), then the probe owns the stream and the arm holds still. The
    status read at the end is one published after the start, never one left from the test before."""
    probe, arm_sim, _ = system
    for service in ("reset", "enable", "start"):
        response = probe.call(service)
        assert response.success, f"/left/{service}: {response.message}"
    started = probe.node.get_clock().now().nanoseconds * 1e-9

    def fresh_and_running():
        status = probe.status
        return (status.header.stamp.sec + 1e-9 * status.header.stamp.nanosec > started and status.state == "running"
                and status.reason == "")

    # Hold where it is until a status after the start shows the probe's commands executed (another
    # owner's stream times out first).
    here = np.append(arm_sim.plant.joint_positions(), arm_sim.plant.gripper_opening())
    assert stream_until(probe, here, fresh_and_running, timeout=30.0), probe.status
    executed = probe.status.commands_executed
    assert stream_until(probe, here, lambda: fresh_and_running() and probe.status.commands_executed > executed,
                        timeout=30.0), probe.status


def stream_until(probe, target, done, timeout=10.0):
    """Publish ``target`` at ~100 Hz (as the policy does) until ``done()``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe.send(target)
        if done():
            return True
        time.sleep(0.01)
    return False


def test_joint_states_have_names_units_and_rate(system):
    probe, arm_sim, _ = system
    probe.states.clear()
    wait_for(lambda: len(probe.states) >= 100, what="100 joint_states")
    msg = probe.states[-1]
    assert list(msg.name) == NAMES
    assert len(msg.velocity) == 7 and len(msg.effort) == 7
    # Positions are the plant's, in rad and m, to the SDK's 0.001 deg / 0.001 mm resolution.
    q = np.array(msg.position)
    assert np.allclose(q[:6], arm_sim.plant.joint_positions(), atol=1e-3)
    assert math.isclose(q[6], arm_sim.plant.gripper_opening(), abs_tol=1e-4)
    stamps = np.array([s.header.stamp.sec + 1e-9 * s.header.stamp.nanosec for s in probe.states[-100:]])
    assert np.all(np.diff(stamps) >= 0)  # ordered; the rate itself is a benchmark, not a test
    assert len(set(stamps.tolist())) > 1


def test_commands_move_the_arm_in_si_units(system):
    probe, arm_sim, _ = system
    full = np.append(TARGET, 0.03)
    reached = stream_until(probe, full, lambda: np.allclose(arm_sim.plant.joint_positions(), TARGET, atol=2e-3)
                           and abs(arm_sim.plant.gripper_opening() - 0.03) < 5e-4)
    assert reached, f"plant at {arm_sim.plant.joint_positions()}, gripper {arm_sim.plant.gripper_opening()}"
    wait_for(lambda: np.allclose(probe.latest(), full, atol=3e-3), what="joint_states to show the target")
    wait_for(lambda: probe.status.commands_executed > 0, what="arm_status to count executed commands")


def test_bad_commands_are_refused_and_counted(system):
    probe, arm_sim, _ = system
    before = arm_sim.plant.joint_positions()
    rejected = probe.status.commands_rejected
    # One at a time: joint_cmd keeps only the newest command (depth 1).
    probe.send([math.nan] + [0.0] * 6)
    wait_for(lambda: probe.status.commands_rejected >= rejected + 1, what="the NaN command refused")
    probe.cmd.publish(JointState(name=["joint1"], position=[0.1]))  # not this arm's names
    wait_for(lambda: probe.status.commands_rejected >= rejected + 2, what="the misnamed command refused")
    # Neither moved the arm: it still holds the last valid target (not joint 1 at 0 or 0.1).
    assert np.allclose(arm_sim.plant.joint_positions(), before, atol=3e-3)


def test_emergency_stop_holds_until_reset(system):
    probe, arm_sim, _ = system
    assert probe.call("emergency_stop").success
    wait_for(lambda: probe.status.emergency_stopped and probe.status.holding, what="e-stop status")
    frozen = arm_sim.plant.joint_positions()
    moved = stream_until(probe, np.append(frozen + 0.04, 0.02),
                         lambda: not np.allclose(arm_sim.plant.joint_positions(), frozen, atol=1e-3), timeout=1.0)
    assert not moved, "the arm moved while emergency-stopped"
    # (a feedback gap on a busy machine can name itself first for a moment: wait, do not sample)
    wait_for(lambda: "emergency stop" in probe.status.reason, what="the e-stop named as the reason")

    # ISO 13850: clearing the stop must not start motion. Until the start service, nothing moves,
    # whatever is streamed.
    assert probe.call("reset").success
    wait_for(lambda: not probe.status.emergency_stopped and probe.status.awaiting_start, what="e-stop cleared")
    assert probe.status.state == "awaiting_start" and probe.status.holding and "start" in probe.status.reason
    executed = probe.status.commands_executed
    # (0.3 rad away: a command of this stream still queued when start comes is refused as well)
    moved = stream_until(probe, np.append(frozen + 0.3, 0.02),
                         lambda: not np.allclose(arm_sim.plant.joint_positions(), frozen, atol=1e-3), timeout=1.0)
    assert not moved, "the arm moved after reset, before start"
    assert probe.status.commands_executed == executed

    assert probe.call("start").success
    wait_for(lambda: probe.status.state == "running" and not probe.status.awaiting_start, what="running after start")
    # A commander still aiming at a target far from the measured pose is refused, not ramped to.
    far = frozen + np.array([0.3, 0.0, 0.0, 0.0, 0.0, 0.0])
    moved = stream_until(probe, np.append(far, 0.02),
                         lambda: not np.allclose(arm_sim.plant.joint_positions(), frozen, atol=1e-3), timeout=1.0)
    assert not moved, "the arm moved toward a target far from the measured pose after start"
    wait_for(lambda: "measured pose" in probe.status.reason, what="the refusal reported")
    # Starting from the measured pose (within the step limit) resumes motion.
    goal = frozen + np.array([0.03, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert stream_until(probe, np.append(goal, 0.02),
                        lambda: np.allclose(arm_sim.plant.joint_positions(), goal, atol=2e-3))
    wait_for(lambda: probe.status.reason == "", what="the refusal cleared")


def test_start_is_refused_while_estopped(system):
    probe, _, _ = system
    assert probe.call("emergency_stop").success
    response = probe.call("start")
    assert not response.success and "reset" in response.message
    assert probe.call("reset").success
    assert probe.call("start").success


def test_disable_then_enable(system):
    probe, _, _ = system
    assert probe.call("disable").success
    wait_for(lambda: not probe.status.enabled and "disabled" in probe.status.reason, what="disabled status")
    response = probe.call("enable")
    assert response.success, response.message
    wait_for(lambda: probe.status.enabled and not probe.status.holding, what="enabled status")


def test_bad_parameter_is_named(system):
    with pytest.raises(ConfigError, match="command_rate_hz"):
        DriverNode(arm=None, namespace="/right", parameter_overrides=[Parameter("command_rate_hz", value=-5.0)])
    with pytest.raises(ConfigError, match="bus_type"):
        DriverNode(arm=None, namespace="/right", parameter_overrides=[Parameter("bus_type", value="usb")])


def test_one_publisher_owns_the_command_stream(system, capfd):
    probe, arm_sim, _ = system
    intruder = rclpy.create_node("intruder")
    try:
        pub = intruder.create_publisher(JointState, "/left/joint_cmd", COMMAND_QOS)
        wait_for(lambda: pub.get_subscription_count() >= 1, what="the intruder to find the driver")
        start = arm_sim.plant.joint_positions()
        hold = np.append(start, arm_sim.plant.gripper_opening())
        # The probe takes the stream first (alone), then both publish: the probe keeps it.
        assert stream_until(probe, hold, lambda: probe.status.owner != "")
        owner = probe.status.owner
        refused = probe.status.commands_not_owner
        away = JointState(name=NAMES, position=[float(v) for v in np.append(start + 0.04, 0.02)])

        def both_publish_until(done, timeout=10.0):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not done():
                probe.send(hold)
                pub.publish(away)
                time.sleep(0.01)
            return done()

        assert both_publish_until(lambda: probe.status.commands_not_owner > refused), "the intruder was not refused"
        assert probe.status.owner == owner
        assert np.allclose(arm_sim.plant.joint_positions(), start, atol=1e-3), "the arm followed the intruder"
        # The refusal is logged at most once per 2 s per arm (an earlier test may have just used that slot):
        # keep both publishing until the line comes.
        logged = []
        assert both_publish_until(lambda: logged.append(capfd.readouterr().err) or "owns the stream" in "".join(logged)), \
            "the refused publisher was not told who owns the stream"
        assert probe.status.owner == owner

        # Once the owner is silent for owner_timeout_s, the other publisher takes over.
        deadline = time.monotonic() + 10.0
        while probe.status.owner == owner and time.monotonic() < deadline:
            pub.publish(away)
            time.sleep(0.01)
        assert probe.status.owner not in ("", owner), "ownership did not pass to the remaining publisher"
        deadline = time.monotonic() + 10.0
        while np.allclose(arm_sim.plant.joint_positions(), start, atol=1e-3) and time.monotonic() < deadline:
            pub.publish(away)
            time.sleep(0.01)
        assert not np.allclose(arm_sim.plant.joint_positions(), start, atol=1e-3), "the new owner is not followed"
    finally:
        intruder.destroy_node()


def test_a_restarted_driver_takes_the_arm_over_where_it_is(system):
    """The driver's ROS side goes away mid-run (its process ends: topics and services leave the graph)
    and a fresh one takes the same arm: the arm keeps its last target meanwhile, and the new driver
    reports it and follows the first commander again from where it stands."""
    from smp_ros.nodes.arm_bridge import ArmBridge

    probe, arm_sim, driver = system
    here = arm_sim.plant.joint_positions()
    driver.bridge.close()
    closed_at = probe.node.get_clock().now().nanoseconds * 1e-9
    resume_at = arm_sim.emu.time + 0.5
    wait_for(lambda: arm_sim.emu.time > resume_at, what="0.5 s of the arm's time without a driver")
    assert np.allclose(arm_sim.plant.joint_positions(), here, atol=1e-3), "the arm moved without its driver"
    late = [s for s in probe.states if _stamp(s) > closed_at + 0.1]
    assert not late, f"{len(late)} joint states after the driver went away"

    driver.bridge = ArmBridge(driver, driver.arm, prefix="", command_rate_hz=200.0, joint_names=tuple(NAMES),
                              enable_timeout_s=10.0)
    wait_for(lambda: probe.states and _stamp(probe.states[-1]) > closed_at + 0.1, what="joint states again")
    wait_for(lambda: probe.status.owner == "" and probe.status.commands_executed == 0, what="the new driver's status")
    goal = here + np.array([0.03, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert stream_until(probe, np.append(goal, arm_sim.plant.gripper_opening()),
                        lambda: np.allclose(arm_sim.plant.joint_positions(), goal, atol=2e-3))
    assert probe.status.owner != ""


def _stamp(msg):
    return msg.header.stamp.sec + 1e-9 * msg.header.stamp.nanosec
