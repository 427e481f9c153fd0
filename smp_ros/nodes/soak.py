"""``smp-ros soak``: run the simulated bimanual system for a while and report how it held up.

The graph of ``smp-ros bringup --sim`` in one process: ``/sim`` (MuJoCo, both PiPER arms through
piper_sdk over the CAN emulator, the cameras) and ``/smp/policy`` with the shipped model, episodes
back to back (every task in turn, or ``--task``), for ``--minutes``. A monitor node in the same
process records, from the real topics, every command's header stamp on ``/left|right/joint_cmd``,
``/smp/policy_status`` and ``/left|right/arm_status``; every ``--sample-s`` the RSS of this process
and its descendants (the inference worker) is sampled, the report recomputed and written to
``--json`` (atomically: a run that is killed keeps the figures of its last sample). At the end it
prints a table. The figures and their definitions: ``smp_ros.runtime.soak``.

``--sim-process`` runs ``/sim`` in a child process of its own (``python -m smp_ros.nodes.sim_node``
with the same parameters file), reached through its ``/sim/reset_episode`` service and the
``/smp/episode`` topic: the policy's process then holds only what a robot's computer runs (the
policy node, its inference worker, the monitor), so the command figures are the policy's own rather
than those of a process shared with physics, rendering and CAN emulation. The arms' drivers
(piper_sdk) stay with the simulator: their CAN bus is the emulator's, in that process.

The policy defaults are those of ``smp-ros demo`` on a CPU (the model in a worker process with one
thread, ``--policy-rate`` 4 Hz, ``--inference-deadline`` 0.6 s); ``--policy-rate 0`` keeps the
parameters file's. Ctrl-C / SIGTERM ends the run early with a final report (``"interrupted": true``).
Exit status 0 after the run, 1 when a node died (the report says so); the targets are reported,
not enforced.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

from smp_ros.config import ARMS, BACKENDS, COMMAND_CLOCKS, REFERENCE_BACKEND, TASKS, ConfigError
from smp_ros import topics
from smp_ros.nodes.bringup import SWITCH_INTERVAL_S, Interrupted, wait_for_policy
from smp_ros.runtime import soak


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to run (fractions allowed)")
    parser.add_argument("--json", default="runs/soak.json", help="report, rewritten at every sample")
    parser.add_argument("--config", default="config/bimanual.yaml", help="ROS 2 parameters file")
    parser.add_argument("--model", default="models/smp_sim", help="model directory")
    parser.add_argument("--backend", choices=BACKENDS, default=REFERENCE_BACKEND)
    parser.add_argument("--task", choices=TASKS, help="one task (default: every task in turn)")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the first episode")
    parser.add_argument("--policy-rate", type=float, default=4.0, help="inference rate, Hz (0: the file's)")
    parser.add_argument("--inference-deadline", type=float, default=0.6, help="seconds (0: the file's)")
    parser.add_argument("--command-clock", choices=COMMAND_CLOCKS,
                        help="what paces the policy's commands (default: the parameters file's, else thread)")
    parser.add_argument("--command-priority", type=int, default=None,
                        help="SCHED_FIFO priority 1-99 of the command clock thread, 0 = default scheduling "
                             "(default: the parameters file's)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the model in this process instead of a worker process")
    parser.add_argument("--sim-process", action="store_true",
                        help="run the simulator (and the arms' drivers) in a child process of its own")
    parser.add_argument("--warmup-s", type=float, default=None,
                        help="memory baseline after this many seconds (default: 60 s, at most a fifth of the run)")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples and reports")


def run(args: argparse.Namespace) -> int:
    from smp_ros.ros_params import ParamsFile, sim_camera_size

    params = ParamsFile.load(args.config)
    if not args.minutes > 0:
        raise ConfigError(f"--minutes: expected > 0, got {args.minutes}")
    if not args.sample_s > 0:
        raise ConfigError(f"--sample-s: expected > 0, got {args.sample_s}")
    if args.policy_rate < 0 or args.inference_deadline < 0:
        raise ConfigError("--policy-rate and --inference-deadline: expected >= 0 (0 keeps the file's)")
    if not Path(args.model).is_dir():
        raise ConfigError(f"--model: expected a model directory, got {args.model!r}")
    duration = 60.0 * args.minutes
    warmup = args.warmup_s if args.warmup_s is not None else min(60.0, duration / 5)
    if not 0 <= warmup < duration:
        raise ConfigError(f"--warmup-s: expected 0 <= warm-up < the run ({duration:g} s), got {warmup}")

    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.parameter import Parameter

    from smp_ros.nodes.policy_node import PolicyNode
    from smp_ros.nodes.ros_util import PoolExecutor, Spinner, shutdown_nodes
    from smp_ros.nodes.sim_node import SimNode

    overrides = {"model": args.model, "backend": args.backend, "camera_size": sim_camera_size(params),
                 "inference_process": not args.in_process}
    if not args.in_process:
        overrides["threads"] = 1  # as the demo: the worker's torch threads would fight the simulator
    if args.policy_rate:
        overrides["policy_rate_hz"] = args.policy_rate
    if args.inference_deadline:
        overrides["inference_deadline_s"] = args.inference_deadline
    if args.task:
        overrides["task"] = args.task
    if args.command_clock:
        overrides["command_clock"] = args.command_clock
    if args.command_priority is not None:
        overrides["command_priority"] = args.command_priority
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    rclpy.init(args=["--ros-args", "--params-file", str(args.config)])
    executor = PoolExecutor()
    nodes, spinner, report, soak_run, sim, sim_failure = [], None, None, None, None, ""
    try:
        # On the wall clock, as a real robot: the soak measures real-time command deadlines (the
        # simulator's /clock would make every figure one of simulated time), and the policy, which
        # is not started on use_sim_time here, must not get messages stamped on another clock.
        if args.sim_process:
            sim = RemoteSim(rclpy.create_node("soak_sim_client"), args, params)
            nodes.append(sim.node)
        else:
            sim = LocalSim(SimNode(parameter_overrides=[Parameter("publish_clock", value=False)]
                                   + ([Parameter("task", value=args.task)] if args.task else [])))
            nodes.append(sim.node)
        policy = PolicyNode(parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
        nodes.append(policy)
        monitor = Monitor(rclpy.create_node("soak_monitor"))
        nodes.append(monitor.node)
        for node in nodes:
            executor.add_node(node)
        spinner = Spinner(executor, nodes)
        spinner.start()  # inside the try: see Spinner.start
        wait_for_policy(policy, spinner)
        soak_run = SoakRun(args, duration, warmup, policy.runtime, monitor, spinner)
        report = soak_run.run(sim, policy)
    except (KeyboardInterrupt, ExternalShutdownException, Interrupted):
        pass  # finished below, as an interrupted run
    except SimProcessDied as exc:
        sim_failure = str(exc)
    finally:
        shutdown_nodes(spinner, executor, nodes)
        rclpy.try_shutdown()
        if sim is not None:
            sim.close()
    failure = (spinner.failure if spinner is not None else "") or sim_failure
    if report is None and soak_run is not None:
        report = soak_run.finish(interrupted=True)
    if report is not None:
        if failure:
            report["node_failure"] = failure
            soak.write_json(args.json, report)
        print(soak.format_table(report))
        print(f"report: {args.json}")
    if failure:
        print(f"soak: {failure}", file=sys.stderr)
        return 1
    return 0


class Monitor:
    """Records what the system publishes: command stamps, policy and arm status (plain values)."""

    def __init__(self, node) -> None:
        from rclpy.qos import QoSDurabilityPolicy, QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy
        from sensor_msgs.msg import JointState

        from smp_ros.msg import ArmStatus, PolicyStatus
        from smp_ros.nodes.ros_util import LATCHED_QOS

        self.node = node
        self.lock = threading.Lock()
        self.commands: dict[str, list[float]] = {arm: [] for arm in ARMS}
        self.policy: list[soak.StatusSample] = []
        self.arms: dict[str, list[soak.StatusSample]] = {arm: [] for arm in ARMS}
        # Reliable like the publishers, but a deep queue: every command counts, none may be
        # overwritten while this node's callback waits for the GIL.
        deep = QoSProfile(history=QoSHistoryPolicy.KEEP_LAST, depth=1000,
                          reliability=QoSReliabilityPolicy.RELIABLE, durability=QoSDurabilityPolicy.VOLATILE)
        status_qos = QoSProfile(history=QoSHistoryPolicy.KEEP_LAST, depth=100,
                                reliability=LATCHED_QOS.reliability, durability=LATCHED_QOS.durability)
        for arm in ARMS:
            node.create_subscription(JointState, topics.joint_cmd(arm), lambda m, a=arm: self._on_command(a, m), deep)
            node.create_subscription(ArmStatus, topics.arm_status(arm), lambda m, a=arm: self._on_arm(a, m), status_qos)
        node.create_subscription(PolicyStatus, topics.POLICY_STATUS, self._on_policy, status_qos)

    @staticmethod
    def _stamp(msg) -> float:
        return msg.header.stamp.sec + 1e-9 * msg.header.stamp.nanosec

    def _on_command(self, arm: str, msg) -> None:
        with self.lock:
            self.commands[arm].append(self._stamp(msg))

    def _on_policy(self, msg) -> None:
        counters = {"chunks": msg.chunks, "inference_missed_deadlines": msg.missed_deadlines,
                    "skipped_cycles": msg.skipped_cycles, "policy_callback_errors": msg.callback_errors,
                    "worker_restarts": msg.worker_restarts, "skipped_command_periods": msg.skipped_command_periods}
        with self.lock:
            self.policy.append(soak.StatusSample(self._stamp(msg), bool(msg.holding), msg.reason, counters))

    def _on_arm(self, arm: str, msg) -> None:
        state = msg.state or ("running" if msg.connected and msg.enabled and not msg.emergency_stopped
                              else "not running")
        reason = f"{state}: {msg.reason}" if msg.reason else state
        counters = {"callback_errors": msg.callback_errors, "commands_executed": msg.commands_executed,
                    "commands_rejected": msg.commands_rejected, "commands_not_owner": msg.commands_not_owner}
        with self.lock:
            self.arms[arm].append(soak.StatusSample(self._stamp(msg), state != soak.RUNNING, reason, counters))

    def snapshot(self):
        with self.lock:
            return ({a: list(v) for a, v in self.commands.items()}, list(self.policy),
                    {a: list(v) for a, v in self.arms.items()})

    @staticmethod
    def now() -> float:
        # The nodes stamp with the ROS clock, which is the system clock here (no simulated time);
        # read directly so the final report can be made after the node is destroyed.
        return time.time()


class SimProcessDied(RuntimeError):
    """The simulator's child process (``--sim-process``) exited during the run."""


class LocalSim:
    """The soak's view of ``/sim`` in its own process: the SimNode's ``reset_episode`` and
    ``episode_status``; its liveness is the executor's, which the soak's spinner watches."""

    def __init__(self, node) -> None:
        self.node, self.cfg = node, node.cfg

    def reset_episode(self, task: str, seed: int) -> tuple[int, int]:
        return self.node.reset_episode(task, seed)

    def episode_status(self):
        return self.node.episode_status()

    def check_alive(self) -> None:
        pass

    def close(self) -> None:
        pass


class RemoteSim:
    """``/sim`` in a child process, with the two calls the soak makes of a SimNode: ``reset_episode``
    (its service) and ``episode_status`` (the latest ``/smp/episode``)."""

    STOP_TIMEOUT_S = 10.0

    def __init__(self, node, args, params) -> None:
        import subprocess

        from smp_ros.msg import EpisodeStatus
        from smp_ros.nodes.ros_util import LATCHED_QOS
        from smp_ros.ros_params import SIM_NODE, sim_config
        from smp_ros.srv import ResetEpisode

        self.node = node
        self.cfg = sim_config(params.for_node(SIM_NODE), where=f"{args.config}: {SIM_NODE}")
        self._status = None
        node.create_subscription(EpisodeStatus, topics.EPISODE, self._on_status, LATCHED_QOS)
        self._reset = node.create_client(ResetEpisode, f"{SIM_NODE}/reset_episode")
        self._request_type = ResetEpisode.Request
        command = [sys.executable, "-m", "smp_ros.nodes.soak", "--sim-child", "--ros-args", "--params-file",
                   str(args.config), "-p", "publish_clock:=false"] + (["-p", f"task:={args.task}"] if args.task else [])
        # Its own process group: a Ctrl-C at the terminal reaches the soak, which stops the child
        # (close); the pipe on its stdin ends it should the soak die without closing it.
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, start_new_session=True)

    def _on_status(self, msg) -> None:
        self._status = msg

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise SimProcessDied(f"the simulator process (--sim-process) exited with status {code}")

    def reset_episode(self, task: str, seed: int, timeout: float = 120.0) -> tuple[int, int]:
        """Start an episode through ``/sim/reset_episode``; (episode, seed) as SimNode.reset_episode."""
        deadline = time.monotonic() + timeout
        while not self._reset.wait_for_service(timeout_sec=0.5):
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"soak: no /sim/reset_episode service within {timeout:g} s")
        future = self._reset.call_async(self._request_type(task=task, seed=int(seed)))
        while not future.done():
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"soak: /sim/reset_episode did not answer within {timeout:g} s")
            time.sleep(0.02)
        reply = future.result()
        if not reply.success:
            raise SimProcessDied(f"/sim/reset_episode refused ({task}, seed {seed}): {reply.message}")
        # The status of the episode just started, not the one before it.
        while self._status is None or self._status.episode != reply.episode:
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"soak: no /smp/episode status of episode {reply.episode} within {timeout:g} s")
            time.sleep(0.02)
        return reply.episode, reply.seed

    def episode_status(self):
        return self._status

    def close(self) -> None:
        """SIGINT (the node's clean stop), then SIGKILL if it has not exited in STOP_TIMEOUT_S."""
        import signal
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.stdin.close()
            try:
                self.process.wait(self.STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class SoakRun:
    """The episode loop and the periodic report."""

    def __init__(self, args, duration: float, warmup: float, runtime, monitor: Monitor, spinner) -> None:
        self.args, self.duration, self.warmup = args, duration, warmup
        self.rate = float(runtime.command_rate_hz)
        self.command_clock = runtime.command_clock
        self.command_priority = runtime.command_priority
        self.monitor, self.spinner = monitor, spinner
        self.memory: list[tuple[float, dict]] = []
        self.episodes: list[dict] = []
        self.started = time.monotonic()
        self.started_ros = monitor.now()
        self.load_start = os.getloadavg()
        self.next_sample = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def run(self, sim, policy) -> dict:
        tasks = [self.args.task] if self.args.task else list(TASKS)
        seed, i = self.args.seed, 0
        episode_s = sim.cfg.episode_steps / sim.cfg.control_rate_hz
        self._tick()
        while self.elapsed() < self.duration:
            task = tasks[i % len(tasks)]
            i += 1
            episode, used_seed = sim.reset_episode(task, seed)
            seed += 1
            policy.runner.set_task(task)
            begun = self.elapsed()
            guard = begun + 10.0 * episode_s + 60.0  # wall-clock guard only: episodes run on simulated time
            while True:
                status = sim.episode_status()
                if status.episode == episode and status.done:
                    self.episodes.append({"task": task, "seed": used_seed, "success": bool(status.success),
                                          "progress": float(status.progress), "sim_time_s": float(status.sim_time),
                                          "wall_s": self.elapsed() - begun})
                    break
                if self.elapsed() >= self.duration:
                    break  # the run ends mid-episode; that episode is not counted
                if self.elapsed() > guard:
                    raise TimeoutError(f"soak: episode {episode} ({task}) did not finish in {guard - begun:.0f} s")
                if not self.spinner.running():
                    raise Interrupted("an episode")
                sim.check_alive()
                self._tick()
                time.sleep(0.05)
            self._tick()
        return self.finish(interrupted=False)

    def _tick(self) -> None:
        if self.elapsed() >= self.next_sample:
            self.next_sample += self.args.sample_s
            self.memory.append((self.elapsed(), soak.process_tree_rss()))
            soak.write_json(self.args.json, self.report(interrupted=False, final=False))

    def finish(self, interrupted: bool) -> dict:
        self.memory.append((self.elapsed(), soak.process_tree_rss()))
        report = self.report(interrupted=interrupted, final=True)
        soak.write_json(self.args.json, report)
        return report

    def report(self, *, interrupted: bool, final: bool) -> dict:
        commands, policy, arms = self.monitor.snapshot()
        end = self.monitor.now()
        holds = [s.stamp for s in policy if s.holding]
        per_arm = {arm: soak.command_figures(commands[arm], holds, 1.0 / self.rate) for arm in ARMS}
        arm_counters = {arm: soak.latest_counters(arms[arm]) for arm in ARMS}
        counters = soak.latest_counters(policy)
        counters["arm_callback_errors"] = sum(c.get("callback_errors", 0) for c in arm_counters.values())
        a = self.args
        report = {
            "command": "smp-ros soak " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["soak"] else " ".join(sys.argv),
            "final": final, "interrupted": interrupted,
            "duration_s": self.duration, "elapsed_s": self.elapsed(),
            "machine": {"cpus": os.cpu_count(), "load_avg_start": list(self.load_start),
                        "load_avg_now": list(os.getloadavg()), "nice": os.nice(0)},
            "settings": {"config": a.config, "model": a.model, "backend": a.backend, "task": a.task or "all",
                         "policy_rate_hz": a.policy_rate or "file", "inference_deadline_s": a.inference_deadline or "file",
                         "inference_process": not a.in_process, "sim_process": a.sim_process, "warmup_s": self.warmup, "sample_s": a.sample_s,
                         "command_clock": self.command_clock, "command_priority": self.command_priority},
            "command_rate_hz": self.rate,
            "episodes": {"completed": len(self.episodes), "successes": sum(e["success"] for e in self.episodes),
                         "list": self.episodes},
            "commands": {"arms": per_arm, "worst": soak.worst_of(per_arm)},
            "holds": {"policy": soak.hold_figures(policy, end),
                      "arms": {arm: soak.hold_figures(arms[arm], end) for arm in ARMS}},
            "counters": counters, "arm_counters": arm_counters,
            "memory": soak.memory_figures(self.memory, self.warmup),
        }
        report["verdict"] = soak.verdict(report)
        return report


def sim_child(ros_args: list[str]) -> int:
    """The ``--sim-process`` child: ``/sim`` as ``smp_ros.nodes.sim_node`` runs it, stopped (SIGTERM,
    the node's clean stop) when its stdin reaches end of file: the soak closed it or died."""
    import signal

    from smp_ros.nodes import sim_node

    def watch_parent() -> None:
        sys.stdin.buffer.read()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_parent, name="soak-parent-watch", daemon=True).start()
    return sim_node.main([sys.argv[0], *ros_args])  # argv[0] first, as rclpy.init expects


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--sim-child"]:
        return sim_child(argv[1:])
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
