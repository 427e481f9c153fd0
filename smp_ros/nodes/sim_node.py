"""Simulation node: the MuJoCo bimanual world with both PiPER arms emulated at the CAN level.

It exposes exactly what the real drivers and cameras do, so the policy cannot tell the
difference: ``/left|right/joint_states``, ``joint_cmd``, ``arm_status`` and the ``enable``,
``disable``, ``emergency_stop``, ``reset``, ``start`` services (each arm is the real piper_sdk talking over a
python-can virtual bus to ``smp_ros.sim.can_emulator``), and ``/cameras/<name>/image_raw`` plus
``camera_info``. For evaluation it adds ``/smp/task`` (latched), ``/smp/episode``
(smp_ros/EpisodeStatus, 10 Hz) and the ``/sim/reset_episode`` service (smp_ros/ResetEpisode).

Simulated teleoperation (``teleop_source: scripted``): each follower arm gets a LEADER arm on its
emulated CAN bus, moved by the scripted demonstrator of the task (``smp_ros.sim.teleop``), as on a
real PiPER leader/follower rig in master-slave mode. The followers obey the leaders' frames, so
``joint_cmd`` is not subscribed; each arm publishes ``leader_joint_states`` (what piper_sdk reads of
the leader's frames) beside ``joint_states``, exactly as the driver does in its ``teleop`` mode.
``smp-ros record --teleop`` then records what a real teleop rig records. Every episode reset
re-plans the demonstration for the new scene.

Physics, emulated firmware and rendering run in one simulator thread paced to the wall clock
(times ``real_time_factor``): an OpenGL context belongs to one thread, and stepping the world from
executor callbacks would let a slow render stall the arms' feedback. If the machine cannot keep
up the simulation slows down (with a warning) instead of taking giant steps.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future

from geometry_msgs.msg import Pose
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import QoSProfile, QoSReliabilityPolicy
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import String

from smp_ros.config import TASKS, ConfigError
from smp_ros import topics
from smp_ros.hardware.arm import element_names
from smp_ros.hardware.piper import PiperArm
from smp_ros.msg import EpisodeStatus, ObjectPoses
from smp_ros.nodes.arm_bridge import ArmBridge
from smp_ros.nodes.image_msgs import camera_info, rgb_to_msg
from smp_ros.ros_params import ParamSpec, safety_config, safety_param_specs, sim_config, sim_param_specs
from smp_ros.nodes.ros_util import LATCHED_QOS, SENSOR_QOS, GuardedNode, declare, now_seconds, run, to_stamp
from smp_ros.sim.can_emulator import PiperCanEmulator
from smp_ros.sim.piper_rig import PiperRig
from smp_ros.sim.teleop import ScriptedTeleop
from smp_ros.sim.world import BimanualWorld, SimulationUnstable
from smp_ros.srv import ResetEpisode

SIM_SPECS = [
    ParamSpec("task", TASKS[0], f"task whose scene is simulated, one of {list(TASKS)}"),
    ParamSpec("seed", 0, "seed of the first episode's scene; later episodes count up from it"),
    ParamSpec("real_time_factor", 1.0, "simulated seconds per wall-clock second"),
    ParamSpec("camera_rate_hz", 20.0, "rendered frames per second per camera (simulated time)"),
    ParamSpec("command_rate_hz", 200.0, "joint_states rate and command forwarding rate per arm (Hz)"),
    ParamSpec("episode_status_rate_hz", 10.0, "rate of /smp/episode (Hz)"),
    ParamSpec("speed_percent", 100, "emulated firmware MOVE J speed, percent of 3 rad/s (1..100)"),
    ParamSpec("enable_on_start", True, "enable both emulated arms when the node starts"),
    ParamSpec("publish_clock", False, "publish the simulated time on /clock and stamp every message with it; "
              "nodes started with use_sim_time then run on the simulator's clock, so a simulator slower than "
              "real time slows the whole loop instead of ageing every observation"),
    ParamSpec("teleop_source", "", "'' (joint_cmd drives the arms) or 'scripted' (the scripted demonstrators "
              "move leader arms the followers obey; leader_joint_states is published, joint_cmd ignored)"),
]
TELEOP_SOURCES = ("", "scripted")
# /clock as ROS publishes it (best effort, keep last): a late tick is worth nothing once the next is out.
CLOCK_QOS = QoSProfile(depth=1, reliability=QoSReliabilityPolicy.BEST_EFFORT)
MAX_LAG_S = 0.25  # simulated time the loop may fall behind before it stops trying to catch up


class SimNode(GuardedNode, Node):
    def __init__(self, **kwargs) -> None:
        # destroy_node() also runs on a node that failed to start.
        self._thread: threading.Thread | None = None
        self.rig: PiperRig | None = None
        self.world: BimanualWorld | None = None
        self.bridges: list[ArmBridge] = []
        self.teleop = None  # ScriptedTeleop while teleop_source is 'scripted' (owned by the simulator thread)
        super().__init__("sim", **kwargs)
        p = declare(self, SIM_SPECS + sim_param_specs() + safety_param_specs())
        self.cfg = sim_config(p, where="parameters")
        self.safety = safety_config(p, where="parameters")
        for name in ("real_time_factor", "camera_rate_hz", "command_rate_hz", "episode_status_rate_hz"):
            if not p[name] > 0:
                raise ConfigError(f"parameter {name}: expected > 0, got {p[name]!r}")
        if p["task"] not in TASKS:
            raise ConfigError(f"parameter task: expected one of {TASKS}, got {p['task']!r}")
        if p["teleop_source"] not in TELEOP_SOURCES:
            raise ConfigError(f"parameter teleop_source: expected '' or 'scripted', got {p['teleop_source']!r}")
        self.p = p
        self.task = p["task"]
        self.seed = int(p["seed"])
        self.episode = 0
        self._requests: queue.Queue[tuple[str, int, Future]] = queue.Queue()
        self._stop = threading.Event()
        # Channel names are process-wide in python-can's virtual bus and piper_sdk: make them unique.
        self.channels = {side: f"smp_sim_{side}_{os.getpid()}_{id(self):x}" for side in ("left", "right")}

        self._status: EpisodeStatus | None = None
        # Simulated time on the ROS time line (publish_clock): it starts at the wall time of the
        # node's start and advances with every physics chunk the simulator thread steps.
        self._clock_origin = now_seconds(self)
        self._sim_elapsed = 0.0
        self.clock_pub = self.create_publisher(Clock, "/clock", CLOCK_QOS) if p["publish_clock"] else None
        self.muted_cameras: set[str] = set()  # fault injection: cameras that stopped (fault matrix)
        self.unstable = ""  # why physics halted mid-episode (SimulationUnstable), until the next reset
        self.rig = PiperRig(self.channels, self.safety, p["speed_percent"])
        self._build_world(self.task, self.seed)
        self.rig.connect()
        self._settle(enable=p["enable_on_start"])

        self.bridges = [ArmBridge(self, arm, prefix=f"{side}/", command_rate_hz=p["command_rate_hz"],
                                  joint_names=element_names(side), teleop=bool(p["teleop_source"]),
                                  stamp_clock=self.stamp_now)
                        for side, arm in self.arms.items()]
        self.image_pubs = {c: self.create_publisher(Image, topics.image_raw(c), SENSOR_QOS)
                           for c in self.cfg.cameras}
        self.info_pubs = {c: self.create_publisher(CameraInfo, topics.camera_info(c), SENSOR_QOS)
                          for c in self.cfg.cameras}
        self.task_pub = self.create_publisher(String, topics.TASK, LATCHED_QOS)
        # The tracked objects' poses at the camera rate, as a tracker would publish them on a real robot.
        self.objects_pub = self.create_publisher(ObjectPoses, topics.OBJECT_POSES, SENSOR_QOS)
        self.episode_pub = self.create_publisher(EpisodeStatus, topics.EPISODE, LATCHED_QOS)
        self.create_service(ResetEpisode, "~/reset_episode", self._on_reset,
                            callback_group=MutuallyExclusiveCallbackGroup())
        self._begin_episode()
        self._thread = threading.Thread(target=self._loop, name="simulator", daemon=True)
        self._thread.start()
        self.get_logger().info(f"simulating {self.task} (seed {self.seed}) at {p['real_time_factor']:g}x real time, "
                               f"cameras {list(self.cfg.cameras)}"
                               + (", teleop: scripted leader arms" if p["teleop_source"] else ""))

    # ------------------------------------------------------------------ public (bringup, services)

    @property
    def arms(self) -> dict[str, PiperArm]:
        """The arms' drivers (piper_sdk), connected for the node's life."""
        return self.rig.arms if self.rig is not None else {}

    @property
    def emulators(self) -> dict[str, PiperCanEmulator]:
        """The current world's CAN emulators (new ones after a task change)."""
        return self.rig.emulators if self.rig is not None else {}

    def reset_episode(self, task: str = "", seed: int = -1, timeout: float = 30.0) -> tuple[int, int]:
        """Start a new episode (thread-safe; runs on the simulator thread). Returns (episode, seed)."""
        task = task or self.task
        if task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
        future: Future = Future()
        self._requests.put((task, int(seed), future))
        return future.result(timeout=timeout)

    def stamp_now(self) -> float:
        """The time every message of this node is stamped with (s): the simulated time with
        ``publish_clock``, else the node's ROS clock."""
        if self.clock_pub is not None:
            return self._clock_origin + self._sim_elapsed
        return now_seconds(self)

    def episode_status(self) -> EpisodeStatus:
        """The current episode's status; frozen at its final values once ``done``."""
        return self._status

    def on_callback_fault(self, name: str, message: str) -> None:
        for bridge in self.bridges:
            bridge.hold()  # the arms keep their last safe targets

    def destroy_node(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10.0)  # the simulator thread closes the world it rendered with
        else:
            self._close_world()  # never rendered: safe from this thread
        if self.rig is not None:
            self.rig.disconnect()
        super().destroy_node()

    # ------------------------------------------------------------------ simulator thread

    def _loop(self) -> None:
        p, cfg = self.p, self.cfg
        rtf = p["real_time_factor"]
        chunk = max(cfg.physics_dt, round(0.005 / cfg.physics_dt) * cfg.physics_dt)  # ~5 ms per step call
        camera_period, status_period = 1.0 / p["camera_rate_hz"], 1.0 / p["episode_status_rate_hz"]
        wall0, sim_elapsed = time.monotonic(), 0.0
        next_camera = next_status = 0.0
        warned = False
        try:
            while not self._stop.is_set() and self.context.ok():
                self._serve_requests()
                if self.unstable:  # halted after an instability until the next reset; the clock moves on
                    time.sleep(chunk / rtf)
                    wall0 += chunk / rtf
                    continue
                behind = (time.monotonic() - wall0) * rtf - sim_elapsed
                if behind > MAX_LAG_S:
                    if not warned:
                        self.get_logger().warning(f"simulation runs slower than {rtf:g}x real time; "
                                                  f"slowing down instead of taking large steps")
                        warned = True
                    wall0 += (behind - MAX_LAG_S) / rtf
                    behind = MAX_LAG_S
                if behind < chunk:
                    time.sleep(min(chunk - behind, chunk) / rtf)
                    continue
                try:
                    self.world.step(chunk)
                except SimulationUnstable as exc:
                    self._end_unstable_episode(str(exc))
                    continue
                sim_elapsed += chunk
                self._sim_elapsed = sim_elapsed
                if self.clock_pub is not None:
                    self.clock_pub.publish(Clock(clock=to_stamp(self.stamp_now())))
                time.sleep(0)  # let the executor's threads have the GIL between physics chunks
                # Scheduled on the loop's own simulated clock, which a reset does not rewind.
                if sim_elapsed >= next_camera:
                    next_camera = sim_elapsed + camera_period
                    self._publish_cameras()
                    self._publish_objects()
                if sim_elapsed >= next_status:
                    next_status = sim_elapsed + status_period
                    self._publish_status()
        except Exception as exc:
            if self._stop.is_set() or not self.context.ok():
                return  # shutting down: publishing into a closed context is expected to fail
            # Without the simulator nothing moves or reports: the process must end, non-zero.
            self.fatal_error = f"simulator thread stopped: {type(exc).__name__}: {exc}"
            self.get_logger().fatal(self.fatal_error)
        finally:
            # Here, not in destroy_node: the renderer's OpenGL context is current in this thread only.
            self._close_world()

    def _serve_requests(self) -> None:
        while True:
            try:
                task, seed, future = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                if task != self.task:
                    self._close_world()
                    self._build_world(task, self.seed)
                    self.task = task
                self.seed = seed if seed >= 0 else self.seed + 1
                self.world.reset(self.seed)
                if self.teleop is not None:
                    self.teleop.reset()
                self._settle(enable=True)
                self._begin_episode()
                future.set_result((self.episode, self.seed))
            except Exception as exc:
                future.set_exception(exc)

    def _publish_cameras(self) -> None:
        stamp = to_stamp(self.stamp_now())
        for name in self.cfg.cameras:
            # Rendering is the simulator's largest cost: skip cameras nobody listens to.
            if self.image_pubs[name].get_subscription_count() == 0 or name in self.muted_cameras:
                continue
            frame = self.world.render(name)
            self.image_pubs[name].publish(rgb_to_msg(frame, stamp, name))
            cam_id = self.world.model.camera(name).id
            self.info_pubs[name].publish(camera_info(stamp, name, frame.shape[0], frame.shape[1],
                                                     float(self.world.model.cam_fovy[cam_id])))

    def _publish_objects(self) -> None:
        msg = ObjectPoses()
        msg.header.stamp = to_stamp(self.stamp_now())
        msg.header.frame_id = "world"
        names, poses = self.world.object_poses()
        msg.names = list(names)
        for p in poses:
            pose = Pose()
            pose.position.x, pose.position.y, pose.position.z = (float(v) for v in p[:3])
            pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w = (float(v) for v in p[3:])
            msg.poses.append(pose)
        self.objects_pub.publish(msg)

    def _publish_status(self) -> None:
        world = self.world
        final = self._status if self._status is not None and self._status.done else None
        if final is None:  # once done, the episode's result is frozen until the next reset
            msg = EpisodeStatus(task=self.task, episode=self.episode, seed=self.seed, sim_time=world.time,
                                progress=float(world.progress()), success=bool(world.success()))
            msg.done = msg.success or world.time >= self.cfg.episode_steps / self.cfg.control_rate_hz
            if self.unstable:
                msg.success, msg.done = False, True
        else:
            msg = final
        msg.header.stamp = to_stamp(self.stamp_now())
        self._status = msg
        self.episode_pub.publish(msg)

    # ------------------------------------------------------------------ world lifecycle

    def _build_world(self, task: str, seed: int) -> None:
        self.world = BimanualWorld(self.cfg, task, seed)
        self.rig.attach(self.world)
        if self.p["teleop_source"] == "scripted":
            # After the emulators' hooks: the leaders run on the followers' clock.
            self.teleop = ScriptedTeleop(self.world, self.rig.emulators)
            self.world.post_step_hooks.append(self.teleop)

    def _close_world(self) -> None:
        if self.teleop is not None:
            self.teleop.close()
            self.teleop = None
        if self.rig is not None:
            self.rig.detach()
        if self.world is not None:
            self.world.close()

    def _settle(self, enable: bool) -> None:
        """Run 0.1 s of simulated time so the SDK has parsed fresh feedback (and the enable)."""
        for arm in self.arms.values():
            if enable:
                arm.enable()
        self.world.step(0.1)
        self.rig.wait_for_feedback()

    def _end_unstable_episode(self, reason: str) -> None:
        """MuJoCo reset its diverged state mid-episode: the episode ends failed, physics (and with it the
        arms' CAN feedback, so the drivers report stale feedback and nothing moves) stops until the
        next reset_episode; the node lives on."""
        self.unstable = reason
        withheld = self.withheld_feedback_ticks()
        self.get_logger().error(f"episode {self.episode}: {reason}; physics halted until the next episode reset"
                                + (f" ({withheld} CAN feedback tick(s) withheld so far for a non-finite arm state)"
                                   if withheld else ""))
        self._publish_status()

    def withheld_feedback_ticks(self) -> int:
        """CAN feedback ticks the current world's emulators sent nothing for, because the simulated arm's
        state was not finite (a diverging simulation, before its instability check ends the episode)."""
        return sum(emu.nonfinite_ticks for emu in self.emulators.values())

    def _begin_episode(self) -> None:
        self.episode += 1
        self.unstable = ""
        self._status = None
        self.task_pub.publish(String(data=self.task))
        self._publish_status()
        self.get_logger().info(f"episode {self.episode}: {self.task}, seed {self.seed}")

    def _on_reset(self, request: ResetEpisode.Request, response: ResetEpisode.Response) -> ResetEpisode.Response:
        try:
            response.episode, response.seed = self.reset_episode(request.task, request.seed)
            response.success, response.message = True, ""
        except (ValueError, RuntimeError) as exc:
            response.success, response.message = False, str(exc)
        return response


def main(args: list[str] | None = None) -> int:
    return run(SimNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
