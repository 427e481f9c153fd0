"""What every smp_ros node shares: QoS profiles, typed parameter declaration, message <-> numpy
conversion for joint states, and the ``main()`` boilerplate."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import (QoSDurabilityPolicy, QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy,
                       qos_profile_sensor_data)
from sensor_msgs.msg import JointState

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

_PARAM_TYPES = {
    bool: ParameterType.PARAMETER_BOOL,
    int: ParameterType.PARAMETER_INTEGER,
    float: ParameterType.PARAMETER_DOUBLE,
    str: ParameterType.PARAMETER_STRING,
}
_ARRAY_TYPES = {
    bool: ParameterType.PARAMETER_BOOL_ARRAY,
    int: ParameterType.PARAMETER_INTEGER_ARRAY,
    float: ParameterType.PARAMETER_DOUBLE_ARRAY,
    str: ParameterType.PARAMETER_STRING_ARRAY,
}


def declare(node: Node, specs: Iterable[ParamSpec]) -> dict:
    """Declare typed, described parameters and return their values (after overrides) by name.

    A value of the wrong type in a parameters file or on the command line is refused by rclpy with
    an error naming the parameter.
    """
    values = {}
    for spec in specs:
        default = spec.default
        if isinstance(default, list):
            kind = _ARRAY_TYPES[type(default[0])]
            if kind == ParameterType.PARAMETER_DOUBLE_ARRAY:
                default = [float(v) for v in default]
        else:
            kind = _PARAM_TYPES[type(default)]
        descriptor = ParameterDescriptor(description=spec.description, type=kind)
        param = node.declare_parameter(spec.name, default, descriptor)
        value = param.value
        values[spec.name] = list(value) if isinstance(value, (list, tuple, np.ndarray)) else value
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


def spin_node(node: Node, threads: int | None = None) -> None:
    """Spin on a MultiThreadedExecutor until Ctrl-C or an external shutdown."""
    executor = MultiThreadedExecutor(num_threads=threads)
    executor.add_node(node)
    try:
        executor.spin()
    finally:
        executor.shutdown()


def run(make_node: Callable[[], Node], args: list[str] | None = None, threads: int | None = None) -> int:
    """The body of every node's ``main()``: init, build, spin, always destroy and shut down."""
    rclpy.init(args=args)
    node = None
    try:
        node = make_node()
        spin_node(node, threads)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
