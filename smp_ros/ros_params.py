"""Read config/bimanual.yaml (a ROS 2 parameters file) without ROS, and map it onto the config tree.

The same file is given to the nodes with ``--params-file`` (``ros2 launch``, ``ros2 run``,
``smp-ros bringup``) and read here by the CLI, so there is one source of truth for every runtime
setting. The file format is the ROS one::

    /smp/policy:            # a fully qualified node name, or /** for every node
      ros__parameters:
        backend: compiled
        safety:
          max_joint_step: 0.05

Nested mappings become dotted parameter names (``safety.max_joint_step``), exactly as rcl does.
This module imports neither rclpy nor message packages. It sits beside ``config`` rather than inside it:
``config`` is the typed tree every part uses, this is the translation between that tree and the ROS
parameter world (node names, parameter specs, the driver's settings), used by the nodes, the launch
files and the CLI; the driver's parameters need ``hardware.arm``'s joint names, which ``config`` may
not import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smp_ros import topics
from smp_ros.config import BACKENDS, DEVICES, ConfigError, RuntimeConfig, SafetyConfig, SimConfig, SMPConfig, flatten, load_yaml_mapping

# Fully qualified names of the nodes the launch files and bringup start.
POLICY_NODE = "/smp/policy"
SIM_NODE = "/sim"
CAMERA_NODE_NAMESPACE = topics.CAMERAS_NAMESPACE  # camera <name> runs as /cameras/<name>/camera
WILDCARD = "/**"

ParamValue = bool | int | float | str | list

# The policy node on top of the vendor's ROS driver, piper_ros (its ROS 2 node piper_ctrl_single_node,
# one per arm, run in namespaces /left and /right): its follower joint states are ``joint_states_single``
# (names joint1..joint6, gripper; rad and m), it executes JointState commands from ``joint_ctrl_single``
# (joints looked up by those names, any missing one read as 0 rad; the gripper taken from position[6],
# in m). Its ``arm_status`` is a piper_msgs/PiperStatusMsg, not an smp_ros/ArmStatus, and says nothing
# about enable or e-stop in the form the interlock needs, so the interlock is off (README, "Beside piper_ros").
PIPER_ROS_REMAPS = ([(f"/{arm}/joint_states", f"/{arm}/joint_states_single") for arm in ("left", "right")]
                    + [(f"/{arm}/joint_cmd", f"/{arm}/joint_ctrl_single") for arm in ("left", "right")])
PIPER_ROS_POLICY_PARAMS = {"joint_names": [f"joint{i}" for i in range(1, 7)] + ["gripper"], "arm_status_topic": ""}


@dataclass(frozen=True)
class ParamSpec:
    """One node parameter: its name, default (which fixes its type) and what it means."""

    name: str
    default: ParamValue
    description: str

    def __post_init__(self) -> None:
        if isinstance(self.default, list) and not self.default:
            raise ValueError(f"{self.name}: a list parameter needs a non-empty default to fix its type")


class ParamsFile:
    """A parsed ROS 2 parameters file: node name -> flat {parameter: value}."""

    def __init__(self, nodes: dict[str, dict[str, Any]], path: str = "<memory>") -> None:
        self.nodes = nodes
        self.path = path

    @classmethod
    def load(cls, path: str | Path) -> "ParamsFile":
        path = Path(path)
        data = load_yaml_mapping(path, "parameters file")
        nodes: dict[str, dict[str, Any]] = {}
        for key, body in data.items():
            name = key if str(key).startswith("/") else f"/{key}"
            if not isinstance(body, dict) or set(body) != {"ros__parameters"}:
                raise ConfigError(f"{path}: {key}: expected exactly one key 'ros__parameters'")
            params = body["ros__parameters"]
            if not isinstance(params, dict):
                raise ConfigError(f"{path}: {key}.ros__parameters: expected a mapping of parameters")
            nodes[name] = flatten(params)
        return cls(nodes, str(path))

    def for_node(self, fqn: str) -> dict[str, Any]:
        """The parameters rcl would give node ``fqn``: the ``/**`` block, overridden by the node's own."""
        merged = dict(self.nodes.get(WILDCARD, {}))
        merged.update(self.nodes.get(fqn, {}))
        return merged


# --------------------------------------------------------------------------------------------
# RuntimeConfig <-> policy node parameters
# --------------------------------------------------------------------------------------------

_RUNTIME_HELP = {
    "backend": f"inference backend: {' | '.join(BACKENDS)}",
    "device": f"inference device: {' | '.join(DEVICES)}",
    "policy_rate_hz": ("inference calls per second (a new action chunk each call); the policy node warns when it "
                       "differs from the model's own runtime.policy_rate_hz, the rate the model was evaluated at"),
    "command_rate_hz": "joint commands published per second to each arm",
    "command_clock": "what paces the commands: thread (the node's own, on its clock) | executor (a ROS timer)",
    "command_priority": "SCHED_FIFO priority 1-99 of the command clock thread (Linux, needs the right); 0 = default",
    "chunk_blend": "how consecutive chunks are joined: ensemble | splice | none",
    "ensemble_decay": "temporal-ensemble weight decay per chunk (chunk_blend=ensemble)",
    "sync_slop_s": "largest stamp difference (s) between the streams of one observation",
    "task": "task to execute at activation; also settable with the set_task service",
    "inference_process": "run the model in a worker process (CPU shared with a simulator in this process)",
    "camera_size": "[height, width] of the camera frames; the policy node refuses others and fits each to the "
                   "model's data.image_size / data.image_fit ([0, 0] = the model's encoder size)",
    "safety.joint_lower": "lower joint limits j1..j6 (rad)",
    "safety.joint_upper": "upper joint limits j1..j6 (rad)",
    "safety.gripper_range": "gripper opening range [min, max] (m)",
    "safety.max_joint_speed": "largest joint speed a command may ask for (rad/s)",
    "safety.max_joint_step": "largest joint change between two commands (rad)",
    "safety.max_gripper_speed": "largest gripper speed a command may ask for (m/s)",
    "safety.stale_after_s": "an observation older than this (s) is stale: the policy holds",
}


def _specs_of(obj: Any, prefix: str, help_text: dict[str, str], section: str) -> list[ParamSpec]:
    specs = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            specs += _specs_of(value, f"{name}.", help_text, section)
            continue
        if isinstance(value, tuple):
            value = list(value)
        description = help_text.get(name, f"{section}.{name} (see smp_ros.config)")
        specs.append(ParamSpec(name, value, description))
    return specs


def runtime_param_specs(defaults: RuntimeConfig | None = None) -> list[ParamSpec]:
    """Every RuntimeConfig field as a node parameter (nested safety fields as ``safety.<field>``)."""
    return _specs_of(defaults or RuntimeConfig(), "", _RUNTIME_HELP, "runtime")


def safety_param_specs(defaults: SafetyConfig | None = None) -> list[ParamSpec]:
    """SafetyConfig fields as ``safety.<field>`` parameters (the driver's own limits)."""
    return _specs_of(defaults or SafetyConfig(), "safety.", _RUNTIME_HELP, "runtime")


def sim_param_specs(defaults: SimConfig | None = None) -> list[ParamSpec]:
    """SimConfig fields as ``sim.<field>`` parameters."""
    return _specs_of(defaults or SimConfig(), "sim.", {}, "")


def sim_camera_size(params: "ParamsFile") -> list[int]:
    """[height, width] of the simulator's camera frames as ``params`` configures ``/sim``."""
    return list(sim_config(params.for_node(SIM_NODE), where=f"{params.path}: {SIM_NODE}").image_size)


def _section(values: dict[str, Any], names: list[str], strip: str = "") -> dict[str, Any]:
    return {n[len(strip):]: values[n] for n in names if n in values}


def runtime_config(values: dict[str, Any], where: str = "runtime") -> RuntimeConfig:
    """A validated RuntimeConfig from flat parameter values (unknown names are ignored: they belong
    to the node, not to the runtime section)."""
    names = [s.name for s in runtime_param_specs()]
    return _build({"runtime": _section(values, names)}, where).runtime


def safety_config(values: dict[str, Any], where: str = "safety") -> SafetyConfig:
    names = [s.name for s in safety_param_specs()]
    return _build({"runtime": _section(values, names)}, where).runtime.safety


def sim_config(values: dict[str, Any], where: str = "sim") -> SimConfig:
    names = [s.name for s in sim_param_specs()]
    return _build({"sim": _section(values, names, strip="sim.")}, where).sim


def _build(overrides: dict[str, Any], where: str) -> SMPConfig:
    """The default config with parameter values layered on it (dotted names, as rcl has them)."""
    try:
        return SMPConfig().with_overrides(overrides, where=where)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Arm driver
# --------------------------------------------------------------------------------------------

BUS_TYPES = ("socketcan", "virtual")


@dataclass(frozen=True)
class DriverSettings:
    """One PiPER driver's settings, validated; errors name the parameter."""

    side: str
    can_channel: str
    bus_type: str
    enable_on_start: bool
    command_rate_hz: float
    speed_percent: int
    gripper_effort: float
    enable_timeout_s: float
    joint_names: tuple[str, ...]
    safety: SafetyConfig
    owner_timeout_s: float = 0.5
    teleop: bool = False

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, expected: str, got: Any) -> None:
            if not cond:
                raise ConfigError(f"parameter {name}: expected {expected}, got {got!r}")

        need(self.side in ("left", "right"), "side", "'left' or 'right' (or run in namespace /left or /right)",
             self.side)
        need(bool(self.can_channel), "can_channel", "a CAN interface name such as can_left", self.can_channel)
        need(self.bus_type in BUS_TYPES, "bus_type", f"one of {BUS_TYPES}", self.bus_type)
        need(self.command_rate_hz > 0, "command_rate_hz", "> 0", self.command_rate_hz)
        need(1 <= self.speed_percent <= 100, "speed_percent", "an integer 1..100", self.speed_percent)
        need(0.0 <= self.gripper_effort <= 5.0, "gripper_effort", "0..5 N*m", self.gripper_effort)
        need(self.enable_timeout_s > 0, "enable_timeout_s", "> 0 s", self.enable_timeout_s)
        need(self.owner_timeout_s > 0, "owner_timeout_s", "> 0 s", self.owner_timeout_s)
        need(len(self.joint_names) == 7 and len(set(self.joint_names)) == 7 and all(self.joint_names),
             "joint_names", "7 distinct names (joints 1..6, then the gripper)", list(self.joint_names))


def driver_param_specs(side: str) -> list[ParamSpec]:
    from smp_ros.hardware.arm import element_names

    return [
        ParamSpec("can_channel", f"can_{side}", "CAN interface of this arm (one USB-CAN adapter per arm)"),
        ParamSpec("bus_type", "socketcan", "python-can interface: socketcan (hardware) or virtual "
                  "(an emulator on that channel in the same process)"),
        ParamSpec("enable_on_start", True, "enable the motors when the node starts"),
        ParamSpec("command_rate_hz", 200.0, "joint_states publication and command forwarding rate (Hz)"),
        ParamSpec("speed_percent", 50, "firmware MOVE J speed, percent of the 3 rad/s ceiling (1..100)"),
        ParamSpec("gripper_effort", 1.0, "gripper torque limit sent with every gripper target (N*m, 0..5)"),
        ParamSpec("enable_timeout_s", 2.0, "how long the enable service waits for the drivers to confirm, and the start service for fresh feedback (s)"),
        ParamSpec("joint_names", list(element_names(side)), "JointState names of joints 1..6 and the gripper, "
                  "used on joint_states and expected on joint_cmd"),
        ParamSpec("owner_timeout_s", 0.5, "joint_cmd ownership: another publisher may take over the command "
                  "stream only after its owner has been silent this long (s)"),
        ParamSpec("teleop", False, "teleoperation: the arm follows a leader arm on its bus; the driver commands "
                  "nothing (no joint_cmd) and publishes the leader's targets on leader_joint_states"),
    ] + safety_param_specs()


def driver_settings(side: str, values: dict[str, Any]) -> DriverSettings:
    return DriverSettings(
        side=side, can_channel=values["can_channel"], bus_type=values["bus_type"],
        enable_on_start=values["enable_on_start"], command_rate_hz=values["command_rate_hz"],
        speed_percent=values["speed_percent"], gripper_effort=values["gripper_effort"],
        enable_timeout_s=values["enable_timeout_s"], joint_names=tuple(values["joint_names"]),
        safety=safety_config(values, where="parameters"), owner_timeout_s=values["owner_timeout_s"],
        teleop=values.get("teleop", False))
