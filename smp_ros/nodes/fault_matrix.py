"""Fault matrix: every fault of the safety checklist injected into the running simulated system.

``smp-ros fault-matrix`` (or ``tools/fault_matrix.sh``) starts the simulator
(MuJoCo, both PiPER arms through piper_sdk over the CAN emulator) and the policy node in one
process, waits until the policy commands the arms, then injects one fault at a time through the
real topics and services (or, where no topic can carry it, the simulator's and engine's own
hooks), waits for the stated safe reaction, clears the fault and waits for the arms to be
commanded again. It prints one row per fault and writes them to ``--json``:

    fault | expected | detected after | reason | resumed after | first-command jump | result

"first-command jump" is the largest joint distance of the first command after the resume from
the last command before the fault (the command stream never jumps), or, for the cases after
which the policy restarts (e-stop, CAN loss, policy node deactivated), from the measured pose (the restart starts there); it must not exceed ``safety.max_joint_step``.
Exit status 0 when every row passed. The waits are generous (a busy machine makes it slower, not failed);
the times are wall-clock and only describe this run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from smp_ros.config import ARMS, BACKENDS, REFERENCE_BACKEND, ConfigError
from smp_ros import topics

WAIT_S = 60.0


@dataclass
class Row:
    fault: str
    expected: str
    detected_s: float | None = None
    reason: str = ""
    resumed_s: float | None = None
    jump_rad: float | None = None
    ok: bool = False
    note: str = ""


def _stamp(msg) -> float:
    return msg.header.stamp.sec + 1e-9 * msg.header.stamp.nanosec


class Probe:
    """The injector's node: publishers for bad input, clients for the arm services, and records of
    what the system publishes."""

    def __init__(self, node, camera: str):
        from sensor_msgs.msg import Image, JointState
        from std_srvs.srv import Trigger

        from smp_ros.msg import ArmStatus, PolicyStatus
        from rclpy.qos import QoSProfile, QoSReliabilityPolicy

        from smp_ros.nodes.ros_util import COMMAND_QOS, LATCHED_QOS, SENSOR_QOS

        self.node = node
        self.camera = camera
        self.lock = threading.Lock()
        self.status: list = []
        self.arm_status = {arm: None for arm in ARMS}
        self.cmds = {arm: [] for arm in ARMS}
        self.states = {arm: [] for arm in ARMS}
        node.create_subscription(PolicyStatus, topics.POLICY_STATUS, self._on_status, LATCHED_QOS)
        for arm in ARMS:
            node.create_subscription(ArmStatus, topics.arm_status(arm), lambda m, a=arm: self._on_arm(a, m), LATCHED_QOS)
            # Depth 100, not the commands' 1: the record must not lose a command on a busy machine.
            node.create_subscription(JointState, topics.joint_cmd(arm), lambda m, a=arm: self._keep(self.cmds[a], m),
                                     QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE))
            node.create_subscription(JointState, topics.joint_states(arm),
                                     lambda m, a=arm: self._keep(self.states[a], m), SENSOR_QOS)
        self.image_pub = node.create_publisher(Image, topics.image_raw(camera), SENSOR_QOS)
        self.joint_pub = node.create_publisher(JointState, topics.joint_states("left"), SENSOR_QOS)
        self.cmd_pub = node.create_publisher(JointState, topics.joint_cmd("left"), COMMAND_QOS)
        self.clients = {(arm, name): node.create_client(Trigger, f"/{arm}/{name}")
                        for arm in ARMS for name in ("emergency_stop", "reset", "start")}
        from lifecycle_msgs.srv import ChangeState

        self.lifecycle = node.create_client(ChangeState, "/smp/policy/change_state")

    def _on_status(self, msg):
        with self.lock:
            self.status.append(msg)

    def _on_arm(self, arm, msg):
        self.arm_status[arm] = msg

    def _keep(self, items, msg):
        with self.lock:
            items.append(msg)
            del items[:-2000]

    def call(self, arm: str, name: str) -> tuple[bool, str]:
        from std_srvs.srv import Trigger

        client = self.clients[(arm, name)]
        if not client.wait_for_service(timeout_sec=WAIT_S):
            return False, f"/{arm}/{name} not offered"
        future = client.call_async(Trigger.Request())
        deadline = time.monotonic() + WAIT_S
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not future.done():
            return False, f"/{arm}/{name} did not answer"
        return future.result().success, future.result().message

    def transition(self, transition_id: int) -> bool:
        """A lifecycle transition of the policy node through its change_state service."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        if not self.lifecycle.wait_for_service(timeout_sec=WAIT_S):
            return False
        future = self.lifecycle.call_async(ChangeState.Request(transition=Transition(id=transition_id)))
        return _wait(future.done) is not None and future.result().success

    def latest_status(self):
        with self.lock:
            return self.status[-1] if self.status else None

    def commanding(self) -> bool:
        status = self.latest_status()
        return status is not None and not status.holding

    def hold_since(self, t0: float, text: str):
        """The first status at or after ROS time t0 holding with ``text`` in its reason."""
        with self.lock:
            return next((m for m in self.status if _stamp(m) >= t0 and m.holding and text in m.reason), None)

    def first_jump_after(self, t0: float, measured: bool = False) -> float | None:
        """Largest joint distance of the first command after t0 from the last command before t0
        (or, with ``measured``, from the measured pose just before that first command)."""
        jumps = []
        with self.lock:
            for arm in ARMS:
                cmd = next((c for c in self.cmds[arm] if _stamp(c) > t0), None)
                if cmd is None:
                    return None
                reference = self.states[arm] if measured else self.cmds[arm]
                before = [s for s in reference if _stamp(s) < _stamp(cmd)]
                if not before:
                    return None
                jumps.append(float(np.max(np.abs(np.array(cmd.position[:6]) - np.array(before[-1].position[:6])))))
        return max(jumps)


def _wait(predicate, timeout: float = WAIT_S, poll: float = 0.01) -> float | None:
    """Seconds until ``predicate()`` held, or None after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(poll)
    return None


class Matrix:
    def __init__(self, sim, policy, probe: Probe, spinner, step_limit: float, only: tuple[str, ...] = ()):
        self.sim, self.policy, self.probe, self.spinner = sim, policy, probe, spinner
        self.step_limit = step_limit
        self.only = only  # run only the faults whose name contains one of these ('' = all)
        self.rows: list[Row] = []

    def wanted(self, fault: str) -> bool:
        return not self.only or any(text in fault for text in self.only)

    def now(self) -> float:
        return self.probe.node.get_clock().now().nanoseconds * 1e-9

    def run(self, fault: str, expected: str, text: str, inject, clear, *, during=None, from_measured=False):
        """Inject (repeatedly, while waiting, if ``during``), wait for a hold naming ``text``,
        clear, wait for commands again and check the first command's jump."""
        if not self.wanted(fault):
            return Row(fault, expected, note="not run (--only)")  # not in the table
        row = Row(fault, expected)
        if _wait(self.probe.commanding) is None:
            row.note = "the policy was not commanding before the fault"
            self.rows.append(row)
            return row
        t0 = self.now()
        inject()
        start = time.monotonic()
        held = None
        while time.monotonic() - start < WAIT_S:
            held = self.probe.hold_since(t0, text)
            if held is not None:
                break
            if during is not None:
                during()
            time.sleep(0.01)
        row.detected_s = None if held is None else time.monotonic() - start
        row.reason = "" if held is None else held.reason[:90]
        clear()
        t1 = self.now()
        row.resumed_s = _wait(lambda: self.probe.commanding() and self.probe.first_jump_after(t1) is not None)
        row.jump_rad = self.probe.first_jump_after(t1, from_measured) if row.resumed_s is not None else None
        alive = self.spinner.running() and not self.spinner.failure
        row.ok = bool(held is not None and row.resumed_s is not None and alive and row.jump_rad is not None
                      and row.jump_rad <= self.step_limit + 1e-6)
        if not alive:
            row.note = f"system died: {self.spinner.failure}"
        self.rows.append(row)
        return row


def _image(height: int, width: int, encoding: str = "rgb8", step: int | None = None):
    from sensor_msgs.msg import Image

    step = width * 3 if step is None else step
    msg = Image(height=height, width=width, encoding=encoding, step=step)
    msg.data = bytes(step * height)
    return msg


def _second_publisher(m: Matrix, home: list[float]) -> None:
    """Two publishers on one command topic: the policy owns it, the intruder is refused."""
    from sensor_msgs.msg import JointState

    from smp_ros.hardware.arm import element_names

    probe = m.probe
    refused0 = probe.arm_status["left"].commands_not_owner if probe.arm_status["left"] else 0
    far = np.array(home) + np.array([1.0, 0.5, -0.5, 0.5, 0.5, 0.5, 0.0])
    intruder = lambda: probe.cmd_pub.publish(JointState(name=list(element_names("left")),  # noqa: E731
                                                        position=[float(v) for v in far]))
    row = Row("second publisher on /left/joint_cmd (far target)", "refused, policy keeps the stream")
    start = time.monotonic()
    while time.monotonic() - start < WAIT_S:
        intruder()
        status = probe.arm_status["left"]
        if status is not None and status.commands_not_owner > refused0:
            row.detected_s = time.monotonic() - start
            row.reason = f"commands_not_owner {status.commands_not_owner - refused0}, owner {status.owner}"
            break
        time.sleep(0.01)
    q = np.array(probe.states["left"][-1].position[:6])
    row.jump_rad = float(np.max(np.abs(q - far[:6])))  # distance still to the intruder's target
    row.ok = row.detected_s is not None and row.jump_rad > 0.3 and m.spinner.running()
    row.note = "jump = remaining distance to the intruder's target (must stay large)"
    m.rows.append(row)


def run_matrix(m: Matrix, camera: str, size: tuple[int, int]) -> None:

    from smp_ros.hardware.arm import element_names
    from smp_ros.nodes.ros_util import joint_state_msg

    probe, sim, policy = m.probe, m.sim, m.policy
    h, w = size
    image_topic = topics.image_raw(camera)

    def flood_images(msg):
        def send():
            msg.header.stamp = probe.node.get_clock().now().to_msg()
            probe.image_pub.publish(msg)
        return send

    def flood_joints(position, names=element_names("left")):
        def send():
            probe.joint_pub.publish(joint_state_msg(names, m.now(), np.asarray(position, dtype=float)))
        return send

    nothing = lambda: None  # noqa: E731
    home = [0.0, 0.4, -0.6, 0.0, 0.5, 0.0, 0.035]
    for fault, bad in ((f"image {w + 16}x{h + 8} (another resolution)", _image(h + 8, w + 16)),
                       ("image step shorter than a row", _image(h, w, step=w)),
                       ("image encoding yuv422", _image(h, w, "yuv422", step=2 * w))):
        m.run(fault, "refused, hold naming the topic", image_topic, nothing, nothing, during=flood_images(bad))
    for fault, q, names in (("joint state NaN", [np.nan] + home[1:], element_names("left")),
                            ("joint state inf", [np.inf] + home[1:], element_names("left")),
                            ("joint state wrong names", home, element_names("right"))):
        m.run(fault, "refused, hold naming the topic", topics.joint_states("left"), nothing, nothing,
              during=flood_joints(q, names))

    m.run("camera stops", "hold: stale camera", f"stale {image_topic}",
          lambda: sim.muted_cameras.add(camera), lambda: sim.muted_cameras.discard(camera))
    m.run("CAN bus of the left arm silent (unplugged)", "arm disconnected, hold; restart from the measured pose",
          "left arm", lambda: sim.emulators["left"].unplug(), lambda: sim.emulators["left"].replug(),
          from_measured=True)

    # E-stop during motion, then reset: no motion until start.
    moved_after_reset = {}

    def estop():
        probe.call("left", "emergency_stop")

    def reset_then_start():
        probe.call("left", "reset")
        _wait(lambda: probe.arm_status["left"] is not None and probe.arm_status["left"].state == "awaiting_start")
        q0 = np.array(probe.states["left"][-1].position[:6])
        time.sleep(1.0)  # a window in which nothing may move: the policy and driver both hold
        q1 = np.array(probe.states["left"][-1].position[:6])
        moved_after_reset["rad"] = float(np.max(np.abs(q1 - q0)))
        probe.call("left", "start")

    row = m.run("e-stop, reset, start", "hold; no motion after reset until start; resume from measured pose",
                "left arm estopped", estop, reset_then_start, from_measured=True)
    if row in m.rows:
        moved = moved_after_reset.get("rad", float("nan"))
        row.note = f"moved {moved:.4f} rad between reset and start"
        row.ok = row.ok and moved < 2e-3

    # Two publishers on one command topic: the policy owns it, the intruder is refused.
    if m.wanted("second publisher"):
        _second_publisher(m, home)

    # A node restarts mid-episode. The policy node through its lifecycle (what a supervisor does):
    # nothing is commanded while it is inactive, and it plans afresh from the measured pose.
    from lifecycle_msgs.msg import Transition

    m.run("policy node deactivated, then activated", "hold (inactive); resume from the measured pose", "inactive",
          lambda: probe.transition(Transition.TRANSITION_DEACTIVATE),
          lambda: probe.transition(Transition.TRANSITION_ACTIVATE), from_measured=True)

    # The left arm's driver restarts: its topics and services leave the graph (the arm keeps its
    # last target), then a fresh driver takes the same arm. The policy holds on the stale joint
    # states and continues its command stream without a jump.
    from smp_ros.nodes.arm_bridge import ArmBridge

    left = next(i for i, bridge in enumerate(sim.bridges) if bridge.arm.side == "left")

    def driver_down():
        sim.bridges[left].close()

    def driver_up():
        sim.bridges[left] = ArmBridge(sim, sim.arms["left"], prefix="left/", command_rate_hz=sim.p["command_rate_hz"],
                                   joint_names=element_names("left"))

    m.run("left driver restarts (topics gone, then a fresh driver)", "hold: stale joint states; smooth resume",
          "stale /left/joint_states", driver_down, driver_up)

    # Inference faults, through the engine's and runner's own hooks.
    engine = policy.engine
    real_infer = engine.infer

    def nan_infer(obs, seed=None, active=None):
        result = real_infer(obs, seed=seed, active=active)
        result.action[:] = np.nan
        return result

    m.run("model returns NaN", "chunk rejected, hold", "rejected",
          lambda: setattr(engine, "infer", nan_infer), lambda: setattr(engine, "infer", real_infer))
    deadline = policy.runner.deadline
    m.run("inference overruns its deadline", "chunk discarded, hold", "deadline",
          lambda: setattr(policy.runner, "deadline", 1e-6), lambda: setattr(policy.runner, "deadline", deadline))
    if getattr(engine, "pid", None):
        m.run("inference worker killed (SIGKILL)", "hold naming the worker; restarted", "inference worker",
              lambda: os.kill(engine.pid, signal.SIGKILL), nothing)


def print_table(rows: list[Row]) -> None:
    def fmt(x):
        return "-" if x is None else f"{x:.2f}"

    print(f"{'fault':48} {'detected s':>10} {'resumed s':>9} {'jump rad':>8}  result  reason / note")
    for r in rows:
        print(f"{r.fault[:48]:48} {fmt(r.detected_s):>10} {fmt(r.resumed_s):>9} {fmt(r.jump_rad):>8}  "
              f"{'PASS' if r.ok else 'FAIL':6}  {r.reason or ''}{' | ' + r.note if r.note else ''}")
    print(f"{sum(r.ok for r in rows)} of {len(rows)} passed")


# The matrix runs the policy on the CPU (device "cpu" below): every backend but tensorrt (CUDA only, the
# last in BACKENDS).
CPU_BACKENDS = BACKENDS[:-1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="config/bimanual.yaml", help="ROS 2 parameters file")
    parser.add_argument("--model", default="models/smp_sim", help="model directory")
    parser.add_argument("--backend", default=REFERENCE_BACKEND, choices=CPU_BACKENDS)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--only", nargs="+", default=(), metavar="TEXT",
                        help="run only the faults whose name contains one of these (e.g. restart driver)")


def run(args: argparse.Namespace) -> int:
    import rclpy
    from rclpy.parameter import Parameter

    from smp_ros.nodes.bringup import wait_for_policy
    from smp_ros.ros_params import ParamsFile, sim_camera_size
    from smp_ros.nodes.policy_node import PolicyNode
    from smp_ros.nodes.ros_util import PoolExecutor, Spinner, shutdown_nodes
    from smp_ros.nodes.sim_node import SimNode

    params = ParamsFile.load(args.config)
    if not Path(args.model).is_dir():
        raise ConfigError(f"--model: expected a model directory, got {args.model!r}")
    size = sim_camera_size(params)
    # Relaxed timing: the matrix checks behaviour, and this machine may be busy.
    policy_params = {"model": args.model, "backend": args.backend, "device": "cpu", "inference_process": True,
                     "camera_size": size, "policy_rate_hz": 5.0, "inference_deadline_s": 3.0,
                     "safety.stale_after_s": 1.0}
    rclpy.init(args=["--ros-args", "--params-file", str(args.config)])
    executor = PoolExecutor()
    nodes, spinner = [], None
    try:
        # Wall clock for all (the policy is not on use_sim_time here): the faults' timings are real time.
        sim = SimNode(parameter_overrides=[Parameter("safety.stale_after_s", value=1.0),
                                           Parameter("publish_clock", value=False)])
        nodes.append(sim)
        policy = PolicyNode(parameter_overrides=[Parameter(k, value=v) for k, v in policy_params.items()])
        nodes.append(policy)
        probe_node = rclpy.create_node("fault_injector")
        nodes.append(probe_node)
        for node in nodes:
            executor.add_node(node)
        spinner = Spinner(executor, nodes)
        spinner.start()  # inside the try: see Spinner.start
        wait_for_policy(policy, spinner)
        camera = policy.engine.cameras[0] if policy.engine.cameras else sim.cfg.cameras[0]
        probe = Probe(probe_node, camera)
        matrix = Matrix(sim, policy, probe, spinner, policy.runtime.safety.max_joint_step, tuple(args.only))
        if _wait(probe.commanding, timeout=600.0) is None:
            raise RuntimeError("the policy never started commanding the arms")
        run_matrix(matrix, camera, tuple(size))
    finally:
        shutdown_nodes(spinner, executor, nodes)
        rclpy.try_shutdown()
    print_table(matrix.rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([asdict(r) for r in matrix.rows], indent=2))
    return 0 if all(r.ok for r in matrix.rows) else 1

def main(argv: list[str] | None = None) -> int:
    """``python -m smp_ros.nodes.fault_matrix``: the same as ``smp-ros fault-matrix``."""
    parser = argparse.ArgumentParser(prog="smp-ros fault-matrix", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
