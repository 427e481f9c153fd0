"""What every smp_ros node shares: QoS profiles, typed parameter declaration, message <-> numpy
conversion for joint states, the callback guard, and the ``main()`` boilerplate.

Callback guard. In rclpy an exception raised by a callback ends ``executor.spin()``: every node
on that executor stops, so one malformed message could leave the arms without joint states,
commands or status. Every subscription, timer and service callback of an smp_ros node is therefore
registered through ``smp_ros.runtime.guard.CallbackGuard`` (the :class:`GuardedNode` mixin does it in
``create_subscription`` / ``create_timer`` / ``create_service``, so no callback can be forgotten):

- the exception is contained and counted per callback;
- it is logged rate-limited: the first failure of a callback with its traceback (or, for input the
  callback refused, :class:`RefusedInput`, with its message only), then one line per
  ``summary_period_s`` with the count, and one line when the callback recovers;
- the node's hold hook (``on_callback_fault``) runs: the policy stops commanding, a driver drops
  its pending target and keeps the arm at the last safe one;
- the fault stays active until the same callback next completes, and nodes report active faults
  and counts in their status topics.

A failure the guard cannot contain (the executor itself failing, a node's own thread dying and
setting ``fatal_error``) ends the process with a non-zero status: see :class:`Spinner` and
:func:`run`.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import (ConditionReachedException, ExternalShutdownException, MultiThreadedExecutor,
                             ShutdownException, TimeoutException)
from rclpy.exceptions import InvalidHandle
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import (QoSDurabilityPolicy, QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy,
                       qos_profile_sensor_data)
from sensor_msgs.msg import JointState

from smp_ros.runtime import process_exit
from smp_ros.config import ConfigError
from smp_ros.ros_params import ParamSpec
from smp_ros.runtime.guard import CallbackGuard, RefusedInput  # noqa: F401 (re-exported for the nodes)

# Sensor streams (images, joint states): best effort, keep the newest few; a late sample is useless.
SENSOR_QOS = qos_profile_sensor_data
# Commands: reliable, depth 1; only the newest target matters and it must not be silently dropped.
COMMAND_QOS = QoSProfile(history=QoSHistoryPolicy.KEEP_LAST, depth=1,
                         reliability=QoSReliabilityPolicy.RELIABLE,
                         durability=QoSDurabilityPolicy.VOLATILE)
# Status and configuration (arm status, task): latched for late joiners.
LATCHED_QOS = QoSProfile(history=QoSHistoryPolicy.KEEP_LAST, depth=1,
                         reliability=QoSReliabilityPolicy.RELIABLE,
                         durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)

_KINDS = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _coerce(spec: ParamSpec, value):
    """``value`` as the type of ``spec.default``; an integer is accepted for a number (YAML's 200
    for 200.0). ConfigError naming the parameter otherwise."""
    def one(kind: type, v):
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        if type(v) is kind:
            return v
        raise TypeError

    try:
        if isinstance(spec.default, list):
            if not isinstance(value, (list, tuple, np.ndarray)):
                raise TypeError
            return [one(type(spec.default[0]), v) for v in value]
        return one(type(spec.default), value)
    except TypeError:
        if isinstance(spec.default, list):
            expected = f"a list of {_KINDS[type(spec.default[0])]}s"
        else:
            expected = _KINDS[type(spec.default)]
        raise ConfigError(f"parameter {spec.name}: expected {expected} ({spec.description}), "
                          f"got {value!r}") from None


def declare(node: Node, specs: Iterable[ParamSpec]) -> dict:
    """Declare described parameters and return their values (after overrides) by name.

    Declared with dynamic typing so that an integer given for a number is accepted; every value is
    then checked against its default's type, with an error naming the parameter.
    """
    values = {}
    for spec in specs:
        descriptor = ParameterDescriptor(description=spec.description, dynamic_typing=True)
        value = node.declare_parameter(spec.name, spec.default, descriptor).value
        values[spec.name] = _coerce(spec, value)
    return values


def to_stamp(seconds: float) -> Time:
    sec = math.floor(seconds)
    return Time(sec=int(sec), nanosec=min(int(round((seconds - sec) * 1e9)), 999_999_999))


def from_stamp(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def now_seconds(node: Node) -> float:
    return node.get_clock().now().nanoseconds * 1e-9


def joint_state_msg(names: Sequence[str], stamp: float, position: np.ndarray,
                    velocity: np.ndarray | None = None, effort: np.ndarray | None = None) -> JointState:
    msg = JointState()
    msg.header.stamp = to_stamp(stamp)
    msg.name = list(names)
    msg.position = np.asarray(position, dtype=np.float64).tolist()
    if velocity is not None:
        msg.velocity = np.asarray(velocity, dtype=np.float64).tolist()
    if effort is not None:
        msg.effort = np.asarray(effort, dtype=np.float64).tolist()
    return msg


def joint_positions(msg: JointState, names: Sequence[str], topic: str) -> np.ndarray:
    """Positions of ``names`` (in that order) from a JointState; RefusedInput (a ValueError) naming
    the topic and what is missing, malformed or non-finite. Values are not range-checked here (the
    safety layers do that)."""
    if len(msg.position) != len(msg.name):
        raise RefusedInput(f"{topic}: {len(msg.name)} names but {len(msg.position)} positions; "
                         f"expected one position per name")
    index = {n: i for i, n in enumerate(msg.name)}
    missing = [n for n in names if n not in index]
    if missing:
        raise RefusedInput(f"{topic}: missing joint(s) {missing}; expected names {list(names)}, "
                           f"got {list(msg.name)}")
    q = np.array([msg.position[index[n]] for n in names], dtype=np.float64)
    if not np.all(np.isfinite(q)):
        bad = [n for n, v in zip(names, q) if not math.isfinite(v)]
        raise RefusedInput(f"{topic}: non-finite position for {bad}; expected finite rad / m")
    return q


class GuardedNode:
    """Mixin for ``Node`` / ``LifecycleNode`` subclasses (put it first): every subscription, timer
    and service callback goes through the node's :class:`CallbackGuard`. Override
    ``on_callback_fault`` (the hold hook) and ``on_callback_recovered``. A node whose own thread
    died sets ``fatal_error``; :class:`Spinner` then ends the process with a non-zero status."""

    fatal_error: str = ""

    @property
    def guard(self) -> CallbackGuard:
        guard = self.__dict__.get("_guard")
        if guard is None:  # lazily: rclpy's base classes create services before our __init__ runs
            guard = CallbackGuard(self.get_logger(), on_fault=self.on_callback_fault,
                                  on_recover=self.on_callback_recovered, closing=self.closing)
            self.__dict__["_guard"] = guard
        return guard

    def closing(self) -> bool:
        """The context is shut down (a signal): failures are expected then and not reported."""
        return not self.context.ok()

    def on_callback_fault(self, name: str, message: str) -> None:
        """Hold hook: a guarded callback just failed."""

    def on_callback_recovered(self, name: str) -> None:
        """A guarded callback that had failed completed again."""

    def create_subscription(self, msg_type, topic, callback, qos_profile, **kwargs):
        name = f"subscription {self.resolve_topic_name(topic)}"
        return super().create_subscription(msg_type, topic, self.guard.wrap(name, callback), qos_profile, **kwargs)

    def create_timer(self, timer_period_sec, callback, *args, **kwargs):
        name = f"timer {getattr(callback, '__qualname__', repr(callback))}"
        return super().create_timer(timer_period_sec, self.guard.wrap(name, callback), *args, **kwargs)

    def create_service(self, srv_type, srv_name, callback, **kwargs):
        name = f"service {self.resolve_service_name(srv_name) if hasattr(self, 'resolve_service_name') else srv_name}"
        return super().create_service(srv_type, srv_name, self.guard.wrap(name, callback, service=True), **kwargs)


class ClockThread:
    """Calls ``tick()`` every ``period_s`` of ``node``'s clock on a thread of its own.

    Why not a ROS timer: a timer's callback is dispatched by the executor's spinning thread to its
    thread pool, behind whatever sensor callbacks are queued, so each tick waits for a wake-up of
    the spinning thread, a pool thread and their GIL hand-overs (measured: BENCHMARKS.md, "Soak").
    This thread sleeps in rcl (``Clock.sleep_until``, the GIL released) to absolute deadlines
    t0 + n T, so lateness does not accumulate, and follows ROS time when the node uses a simulated
    clock (the clock's jumps wake it). A tick that ends more than a whole period late skips the
    periods it missed instead of running them back to back; they are counted in ``skipped``.

    ``priority`` 1-99 runs the thread under SCHED_FIFO at that priority (Linux), so that other
    processes on its core cannot delay a tick; without the right to (root, CAP_SYS_NICE or an rtprio
    limit) it logs one warning and keeps the default scheduling (``realtime`` says which it got).

    ``tick`` must contain its own failures (a guarded callback); one that escapes ends the thread
    and sets ``node.fatal_error`` (``Spinner`` then ends the process with a non-zero status).
    ``stop()`` returns within one period of the clock; on a paused simulated clock the thread
    leaves at the clock's next jump or the context's shutdown, without ticking again."""

    def __init__(self, node: Node, period_s: float, tick: Callable[[], None], name: str, priority: int = 0) -> None:
        if not period_s > 0:
            raise ValueError(f"period_s: expected > 0, got {period_s}")
        if not 0 <= priority <= 99:
            raise ValueError(f"priority: expected 0 (default scheduling) or 1-99 (SCHED_FIFO), got {priority}")
        self.priority = priority
        self.realtime = False  # running under SCHED_FIFO
        self.node = node
        self.period = rclpy.duration.Duration(nanoseconds=round(period_s * 1e9))
        self.tick = tick
        self.name = name
        self.ticks = 0
        self.skipped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _set_priority(self) -> None:
        try:  # pid 0: the calling thread (a Linux thread is a task of its own)
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self.priority))
            self.realtime = True
        except (AttributeError, OSError) as exc:
            self.node.get_logger().warning(
                f"{self.name}: cannot run at SCHED_FIFO priority {self.priority} ({exc}); default scheduling. "
                "Grant the right (CAP_SYS_NICE, or an rtprio limit in /etc/security/limits.conf) or set the "
                "priority to 0")

    def _loop(self) -> None:
        clock, context = self.node.get_clock(), self.node.context
        if self.priority:
            self._set_priority()
        try:
            deadline = clock.now() + self.period
            while not self._stop.is_set() and context.ok():
                try:
                    reached = clock.sleep_until(deadline, context)
                except rclpy.exceptions.NotInitializedException:  # the context shut down meanwhile
                    return
                if self._stop.is_set():
                    return
                if not reached:  # the clock's source changed (ROS time (de)activated): restart from now
                    deadline = clock.now() + self.period
                    continue
                self.tick()
                self.ticks += 1
                deadline += self.period
                # More than a whole period behind the next deadline: one late tick now, not a burst.
                missed = (clock.now() - deadline).nanoseconds // self.period.nanoseconds
                if missed > 0:
                    self.skipped += missed
                    deadline += rclpy.duration.Duration(nanoseconds=missed * self.period.nanoseconds)
        except BaseException as exc:  # noqa: BLE001 (a tick that escaped its guard: the node is dead)
            if context.ok() and not self._stop.is_set():
                self.node.fatal_error = (f"{self.name} stopped: "
                                         f"{''.join(traceback.format_exception(exc)).rstrip()}")


class PoolExecutor(MultiThreadedExecutor):
    """A MultiThreadedExecutor that hands each ready callback to its thread pool once.

    Why: rclpy's executor (rclpy 9.1) yields, on every wake-up, each task in its task list that
    is not executing yet, and its MultiThreadedExecutor submits it to the pool again, even when
    the task was submitted before and only waits in the pool's queue for a thread (which waits
    for the GIL). Every duplicate costs the spinning thread a pass and a pool thread a GIL
    hand-over to find the task already run, and every finished callback wakes the executor,
    which queues all waiting tasks once more: with a few hundred messages a second (two
    joint-state streams, a 100 Hz command timer) the duplicates crowd the real callbacks out.
    A process spinning the policy node and a fake robot this way delivered joint states over a
    second late and ran ~3 command ticks a second on an idle 2-core machine. Upstream rclpy
    fixed the same later (ros2/rclpy#1547).

    Here a task leaves the executor's task list while it waits in the pool's queue or runs, and
    comes back only if it suspended unfinished (a coroutine awaiting a future), to be resumed
    as before."""

    # How long the spinning thread sleeps between looks at the pool's queue while every pool thread
    # is busy (a bound, not a rate: it is woken as soon as the pool takes a task).
    POOL_WAIT_S = 0.01

    def __init__(self, num_threads: int | None = None, **kwargs) -> None:
        super().__init__(num_threads, **kwargs)
        self._queued: set = set()  # tasks handed to the pool whose thread has not started them
        self._queued_lock = threading.Lock()
        self._taken = threading.Condition(self._queued_lock)  # notified when the pool takes a task

    def wait_for_ready_callbacks(self, *args, **kwargs):
        while True:
            # Backpressure: while a task waits in the pool's queue, every pool thread is busy and
            # nothing new could run. Waiting on rclpy's wait set then returned at once, over and
            # over, without yielding anything (measured: the spinning thread at 100 % of a core,
            # holding the GIL the pool threads need, for as long as the pool stayed busy; on a
            # loaded machine ROS tests lost their messages for seconds). Sleep until the pool
            # takes the queued tasks.
            with self._taken:
                while self._queued and not self._is_shutdown and self._context.ok():
                    self._taken.wait(self.POOL_WAIT_S)
            ready = super().wait_for_ready_callbacks(*args, **kwargs)
            with self._queued_lock:
                if ready[0] not in self._queued:  # (a task listed again before it was taken out)
                    return ready

    def _spin_once_impl(self, timeout_sec=None, wait_condition=lambda: False) -> None:
        try:
            task, entity, node = self.wait_for_ready_callbacks(timeout_sec, None, wait_condition)
        except (ExternalShutdownException, ShutdownException, TimeoutException, ConditionReachedException):
            return
        with self._tasks_lock:
            self._tasks = [entry for entry in self._tasks if entry[0] is not task]
        with self._queued_lock:
            self._queued.add(task)
        self._executor.submit(self._run_task, task, entity, node)
        self._futures.append(task)
        for future in list(self._futures):
            if future.done():
                self._futures.remove(future)
                future.result()  # a callback's exception ends spin(), as in rclpy

    def _run_task(self, task, entity, node) -> None:
        with self._taken:
            self._queued.discard(task)
            self._taken.notify_all()
        try:
            task()
        finally:
            if not task.done():  # suspended on an awaited future: list it again to be resumed
                with self._tasks_lock:
                    self._tasks.append((task, entity, node))
                try:
                    self.wake()
                except InvalidHandle:  # the executor was shut down meanwhile
                    pass


class Spinner:
    """Spins an executor in a background thread until the context shuts down (Ctrl-C, SIGTERM) or
    :meth:`stop`, and remembers why it ended. ``failure`` is non-empty when the executor raised or
    a node reported ``fatal_error``: the process must then exit non-zero.

    Whether the thread still spins is tracked with an Event the thread sets after its last rclpy
    call, never with ``Thread.join`` / ``is_alive``. Why: in CPython before 3.13 a KeyboardInterrupt
    that lands in ``Thread.join(timeout)`` while the thread runs releases the thread's internal lock
    and marks it stopped (python/cpython#90882): ``is_alive()`` then answers False for a thread that
    is still inside ``wait_set.wait``. A Ctrl-C in the main thread's wait loop thus let the nodes,
    the executor and the context be torn down under a thread waiting on their handles: a
    segmentation fault, or, once the interpreter finalized, the thread was ended by
    ``pthread_exit`` while unwinding through rclpy's C++ frames, which aborts the process
    ("terminate called without an active exception"). An interrupted ``Event.wait`` leaves no
    such state behind. Callers wait with :meth:`wait`, not ``thread.join``."""

    def __init__(self, executor, nodes: Sequence[Node]) -> None:
        self.executor = executor
        self.nodes = [(node, node.get_fully_qualified_name()) for node in nodes]
        self.error = ""
        self._final: str | None = None  # the failure as it stood when spinning ended
        self._stop = threading.Event()
        self._done = threading.Event()  # set by the thread once it makes no more rclpy calls
        self._started = False
        self._entered = False  # the thread reached its loop (and may be inside rclpy)
        self.thread = threading.Thread(target=self._spin, name="executor", daemon=True)

    def start(self) -> "Spinner":
        """Start spinning. Call it inside the ``try`` whose ``finally`` calls :meth:`stop`: a Ctrl-C
        can land in ``Thread.start()`` after the thread was created."""
        self._started = True
        self.thread.start()
        return self

    def _spin(self) -> None:
        context = self.executor.context
        # stop() reads _entered after setting _stop: if it saw False, this thread sees _stop set
        # below before its first spin_once, so stop() need not wait for it.
        self._entered = True
        try:
            while not self._stop.is_set() and context.ok() and not self._current_failure():
                self.executor.spin_once(timeout_sec=0.1)
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        except Exception as exc:  # a callback outside the guard, or rclpy itself
            # A signal shuts the context down under a running spin_once (rclpy then fails to build
            # its wait set): that is a stop, not a crash.
            if context.ok():
                self.error = f"executor stopped: {''.join(traceback.format_exception(exc)).rstrip()}"
        finally:
            # Latched: what nodes report while being torn down after a signal is not a crash.
            self._final = self._current_failure()
            self._done.set()

    def _current_failure(self) -> str:
        if self.error:
            return self.error
        for node, name in self.nodes:
            fatal = getattr(node, "fatal_error", "")
            if fatal:
                return f"{name}: {fatal}"
        return ""

    @property
    def failure(self) -> str:
        """Why spinning ended abnormally ('' while healthy or after a clean stop)."""
        return self._final if self._final is not None else self._current_failure()

    def running(self) -> bool:
        """Started and not finished: the thread may still be inside rclpy."""
        return self._started and not self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` for spinning to end (a signal, :meth:`stop`, a failure); True once
        it has. Safe to interrupt with Ctrl-C, unlike ``thread.join`` (see the class docstring)."""
        return self._done.wait(timeout)

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the spinning thread to end and wait for it (up to ``timeout``). A Ctrl-C that lands
        in this wait does not cut it short: the executor and the nodes must not be torn down under
        a thread still waiting on their handles."""
        self._stop.set()
        if not self._entered:  # never reached its loop: it will see _stop before touching rclpy
            return
        deadline = time.monotonic() + timeout
        while not self._done.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0.0:
                return
            try:
                self._done.wait(remaining)
            except KeyboardInterrupt:
                continue


def shutdown_nodes(spinner: Spinner | None, executor, nodes: Sequence[Node]) -> None:
    """Stop spinning first, then the executor (waits for callbacks in flight), then destroy the
    nodes: destroying a node while its callbacks still run is what leaves rclpy's "cannot use
    Destroyable" exceptions behind."""
    if spinner is not None:
        spinner.stop()
        if spinner.running():  # still inside rclpy after 2 s: tearing down under it could crash
            print("shutdown: the executor thread did not stop within 2 s; leaving the teardown to the "
                  "process exit", file=sys.stderr)
            return
    # Callbacks already handed to the thread pool must finish before the executor's guard
    # condition is destroyed, or they fail on it and rclpy prints "exception was never retrieved".
    deadline = time.monotonic() + 1.0
    while any(not f.done() for f in list(getattr(executor, "_futures", []))) and time.monotonic() < deadline:
        time.sleep(0.01)
    executor.shutdown(timeout_sec=1.0)
    for node in reversed(list(nodes)):
        node.destroy_node()


def spin_node(node: Node, executor=None) -> None:
    """Spin on ``executor`` (default: a new PoolExecutor) until Ctrl-C or an external shutdown
    (raises on a crash). Returns, or lets a KeyboardInterrupt through, only once the executor
    thread has left rclpy (or after the 2 s of :meth:`Spinner.stop`)."""
    executor = PoolExecutor() if executor is None else executor
    executor.add_node(node)
    spinner = Spinner(executor, [node])
    try:
        # From here rclpy's signal handler ends spinning; a KeyboardInterrupt must not cut the
        # teardown below short (only in run(), which installed the handler; a no-op otherwise).
        process_exit.defer_interrupts()
        spinner.start()
        spinner.wait()  # until Ctrl-C / SIGTERM shuts the context down, or a node dies
    finally:
        shutdown_nodes(spinner, executor, [])
        # run() destroys the node only once nothing spins it any more (see Spinner.stop)
        node.__dict__["_still_spinning"] = spinner.running()
    if spinner.failure:
        raise RuntimeError(spinner.failure)


def cli_parameter_overrides(args: Sequence[str] | None = None) -> list[Parameter]:
    """The ``-p name:=value`` / ``--param name:=value`` rules of the ``--ros-args`` sections of
    ``args`` (default ``sys.argv``), last one winning, as rclpy Parameters.

    Why: rcl files an unqualified ``-p`` under ``/**``, and rclpy then lets a parameters file's
    node-specific block (``/smp/policy: backend: compiled``) beat it, whatever the order on the
    command line. ROS users expect the command line to win (``ros2 run smp_ros policy_node
    --ros-args --params-file config/bimanual.yaml -p backend:=eager``), so :func:`run` hands these
    to the node as ``parameter_overrides``, which rclpy applies over every file. The value is YAML,
    as rcl parses it. Rules qualified with a node name (``node:name:=value``) are left to rcl."""
    import yaml

    args = list(sys.argv if args is None else args)
    found: dict[str, Parameter] = {}
    in_ros_args = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--ros-args":
            in_ros_args = True
        elif arg == "--":
            in_ros_args = False
        elif in_ros_args and arg in ("-p", "--param") and i + 1 < len(args):
            i += 1
            rule = args[i]
            name, sep, text = rule.partition(":=")
            if sep and ":" not in name:
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError as exc:
                    raise ConfigError(f"command line -p {rule}: the value is not YAML ({exc})") from None
                found[name] = Parameter(name, value=value)
        i += 1
    return list(found.values())


def run(make_node: Callable[..., Node], args: list[str] | None = None) -> int:
    """The body of every node's ``main()``: init, build, spin, always destroy and shut down.
    Command-line ``-p`` values win over ``--params-file`` ones (:func:`cli_parameter_overrides`).

    Exit status: 0 after Ctrl-C / SIGTERM; 1 with the error message when the node cannot start (a
    bad parameter, an arm or camera that cannot be opened) or when it died while running (the
    executor failed or a node thread set ``fatal_error``), with the reason on stderr.
    """
    process_exit.prepare()  # a fast exit, a stack trace on a crash (see there)
    # Ctrl-C: KeyboardInterrupt while the node is built; once it spins, rclpy's handler (installed
    # by init, over this one) shuts the context down, the spinner ends and the teardown runs
    # without a KeyboardInterrupt landing in it (spin_node calls defer_interrupts).
    process_exit.catch_interrupts()
    rclpy.init(args=args)
    node = None
    status = 0
    try:
        overrides = cli_parameter_overrides(args)
        node = make_node(parameter_overrides=overrides) if overrides else make_node()
        spin_node(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 1
    finally:
        process_exit.defer_interrupts()  # a repeated Ctrl-C must not cut this teardown short
        if node is not None and not node.__dict__.get("_still_spinning", False):
            node.destroy_node()
        rclpy.try_shutdown()
        process_exit.ignore_interrupts()  # (rclpy's handler is gone now) only the exit is left
    return status
