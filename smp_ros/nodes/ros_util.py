"""What every smp_ros node shares: QoS profiles, typed parameter declaration, message <-> numpy
conversion for joint states, and the ``main()`` boilerplate."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import (QoSDurabilityPolicy, QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy,
                       qos_profile_sensor_data)
from sensor_msgs.msg import JointState

from smp_ros.config import ConfigError
from smp_ros.nodes.params import ParamSpec

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
    """Positions of ``names`` (in that order) from a JointState; ValueError naming the topic and
    what is missing or malformed. Values are not range-checked here (the safety layers do that)."""
    if len(msg.position) != len(msg.name):
        raise ValueError(f"{topic}: {len(msg.name)} names but {len(msg.position)} positions; "
                         f"expected one position per name")
    index = {n: i for i, n in enumerate(msg.name)}
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"{topic}: missing joint(s) {missing}; expected names {list(names)}, "
                         f"got {list(msg.name)}")
    return np.array([msg.position[index[n]] for n in names], dtype=np.float64)


def spin_node(node: Node) -> None:
    """Spin on a MultiThreadedExecutor until Ctrl-C or an external shutdown."""
    executor = MultiThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    finally:
        executor.shutdown()


def run(make_node: Callable[[], Node], args: list[str] | None = None) -> int:
    """The body of every node's ``main()``: init, build, spin, always destroy and shut down.

    A node that cannot start (a bad parameter, an arm or camera that cannot be opened) exits with
    status 1 and its error message, not a traceback.
    """
    rclpy.init(args=args)
    node = None
    try:
        node = make_node()
        spin_node(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, RuntimeError) as exc:
        if node is not None:
            raise  # a failure while running is a bug: keep the traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
