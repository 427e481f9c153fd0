"""The system's default topic names, written once (README, 'Topics', documents type, QoS and rate).

Every name is a default: nodes can be remapped and ``data.topics`` maps any bag's names. Code uses
these names, never the literals. Per-arm names are relative to the arm's namespace (``/left``,
``/right``), so a driver started in a namespace resolves them itself; the functions give the
fully qualified defaults. Imports nothing, so every part of the package may use it.
"""

from __future__ import annotations

# Relative to an arm's namespace: what a driver offers and takes.
JOINT_STATES = "joint_states"  # sensor_msgs/JointState, feedback
JOINT_CMD = "joint_cmd"  # sensor_msgs/JointState, the targets the driver executes
LEADER_JOINT_STATES = "leader_joint_states"  # sensor_msgs/JointState, a leader arm's targets (teleop)
ARM_STATUS = "arm_status"  # smp_ros/ArmStatus

# Relative to a camera's namespace (/cameras/<name>).
IMAGE_RAW = "image_raw"  # sensor_msgs/Image rgb8
CAMERA_INFO = "camera_info"  # sensor_msgs/CameraInfo
CAMERAS_NAMESPACE = "/cameras"

# System-wide.
TASK = "/smp/task"  # std_msgs/String, latched: the task demonstrated or executed
OBJECT_POSES = "/smp/object_poses"  # smp_ros/ObjectPoses
SKILL_STATE = "/smp/skill_state"  # smp_ros/SkillState, one per action chunk
POLICY_STATUS = "/smp/policy_status"  # smp_ros/PolicyStatus, latched
EPISODE = "/smp/episode"  # smp_ros/EpisodeStatus, latched (simulator)

# Templates of the policy node's topic parameters ({camera} / {arm} filled in per stream).
CAMERA_TOPIC_TEMPLATE = f"{CAMERAS_NAMESPACE}/{{camera}}/{IMAGE_RAW}"
ARM_STATUS_TEMPLATE = f"/{{arm}}/{ARM_STATUS}"


def joint_states(arm: str) -> str:
    return f"/{arm}/{JOINT_STATES}"


def joint_cmd(arm: str) -> str:
    return f"/{arm}/{JOINT_CMD}"


def leader_joint_states(arm: str) -> str:
    return f"/{arm}/{LEADER_JOINT_STATES}"


def arm_status(arm: str) -> str:
    return ARM_STATUS_TEMPLATE.format(arm=arm)


def image_raw(camera: str) -> str:
    return CAMERA_TOPIC_TEMPLATE.format(camera=camera)


def camera_info(camera: str) -> str:
    return f"{CAMERAS_NAMESPACE}/{camera}/{CAMERA_INFO}"
