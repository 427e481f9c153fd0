"""One typed configuration tree for smp_ros.

Every section is a frozen-by-convention dataclass validated in ``__post_init__``; errors name the
field at fault and say what was expected. The tree round-trips through YAML (``to_yaml`` /
``from_yaml``) and a few named presets (``tiny``, ``sim``, ``paper``) fix the model and training
sizes. The nodes turn ROS parameters into this tree; the CLI reads the same YAML.

Dimension letters used project-wide: B batch, T_o observation steps, H planning horizon,
D action dimension (14 = 2 x (6 joints + gripper)), K experts, S active set.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from smp_ros import topics

ACTION_DIM = 14  # D: left joints 1-6, left gripper, right joints 1-6, right gripper
ARM_JOINTS = 6
GRIPPER_INDICES: tuple[int, ...] = (ARM_JOINTS, 2 * ARM_JOINTS + 1)  # the grippers' entries of a D-vector
ARM_JOINT_INDICES: tuple[int, ...] = tuple(i for i in range(ACTION_DIM) if i not in GRIPPER_INDICES)  # the arm joints
ACTION_FRAMES = ("absolute", "relative")  # model.action_frame
ARMS = ("left", "right")
CAMERAS = ("cam_high", "cam_left_wrist", "cam_right_wrist")
TASKS = ("pen_cap", "cups_in_bowl", "handover", "pour_beans")
# Object-pose observations (the low-dimensional "state" track): each task's tracked objects in a fixed
# order. A model reads OBJECT_SLOTS poses per step, the task's objects first and zeros after them, so
# one multi-task model sees a fixed-size vector. A pose is position (x, y, z, m, world frame) then the
# orientation quaternion (x, y, z, w) with w >= 0 (q and -q are the same rotation).
TASK_OBJECTS: dict[str, tuple[str, ...]] = {
    "pen_cap": ("pen", "cap"),
    "cups_in_bowl": ("cup_left", "cup_right", "bowl"),
    "handover": ("tool",),
    "pour_beans": ("cup", "bowl"),
}
OBJECT_SLOTS = max(len(v) for v in TASK_OBJECTS.values())  # 3
OBJECT_POSE_DIM = 7  # x, y, z, qx, qy, qz, qw
# Inference backends (runtime/backends), from the reference that runs everywhere to the fastest: one
# that cannot run here falls back to those before it (tensorrt -> compiled -> eager). The names are
# spelled only here; validation, command-line choices and help texts use these tuples.
BACKENDS = ("eager", "compiled", "tensorrt")
REFERENCE_BACKEND = BACKENDS[0]  # runs everywhere: the default of the benchmark and evaluation commands
DEVICES = ("auto", "cpu", "cuda")  # auto: cuda when available, else cpu
COMMAND_CLOCKS = ("thread", "executor")  # runtime.command_clock


class ConfigError(ValueError):
    """A configuration value is out of range or of the wrong kind; the message names the field."""


def _require(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {message}")


# --------------------------------------------------------------------------------------------
# Model (Section 4, Appendix A, B.3 of the SMP paper)
# --------------------------------------------------------------------------------------------


@dataclass
class EncoderConfig:
    """Observation encoder -> state feature s_t (B.3 'Observation encoder')."""

    mode: str = "vision"  # "vision": ResNet-18 per camera + proprio + task; "lowdim": proprio + task only
    cameras: tuple[str, ...] = CAMERAS
    image_size: tuple[int, int] = (96, 96)  # (height, width) fed to the ResNet after resize/crop
    crop_ratio: float = 0.9  # random crop at training, centre crop at inference (Diffusion Policy)
    # Region of interest per camera, cut from the frame before the resize to image_size: camera ->
    # (top, left, height, width) as fractions of the frame. A camera not named keeps its whole frame.
    # Spends the image_size pixels on the workspace (e.g. the table under a fixed overhead camera).
    camera_regions: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    group_norm_groups: int = 16  # BatchNorm -> GroupNorm(C // 16 groups) as Diffusion Policy does
    backbone_width: int = 64  # ResNet-18 stage widths (w, 2w, 4w, 8w); 64 is torchvision's resnet18,
    #                           smaller widths keep the CPU demo model small; features are 8w wide
    proprio_dim: int = ACTION_DIM
    proprio_hidden: int = 128
    num_tasks: int = len(TASKS)
    task_embed_dim: int = 32
    state_dim: int = 256  # d_s: width of s_t after the fusion projection
    # Object poses read per step (0 = none): OBJECT_SLOTS for the state track, where the encoder takes
    # joint states + the tracked objects' poses + task (a tracker's topic on a real robot).
    object_slots: int = 0
    object_hidden: int = 64

    def __post_init__(self) -> None:
        w = "model.encoder"
        _require(self.mode in ("vision", "lowdim"), f"{w}.mode", f"expected 'vision' or 'lowdim', got {self.mode!r}")
        if self.mode == "vision":
            _require(len(self.cameras) >= 1, f"{w}.cameras", "vision mode needs at least one camera")
        _require(len(set(self.cameras)) == len(self.cameras), f"{w}.cameras", f"duplicate names in {self.cameras}")
        _require(len(self.image_size) == 2 and min(self.image_size) >= 32, f"{w}.image_size",
                 f"expected (height, width) >= 32 px, got {self.image_size}")
        _require(0.5 <= self.crop_ratio <= 1.0, f"{w}.crop_ratio", f"expected 0.5..1.0, got {self.crop_ratio}")
        for cam, region in self.camera_regions.items():
            _require(cam in self.cameras, f"{w}.camera_regions.{cam}", f"not one of model.encoder.cameras {self.cameras}")
            _require(len(region) == 4, f"{w}.camera_regions.{cam}", f"expected (top, left, height, width), got {region}")
            top, left, height, width = region
            _require(height > 0 and width > 0 and top >= 0 and left >= 0 and top + height <= 1 + 1e-9
                     and left + width <= 1 + 1e-9, f"{w}.camera_regions.{cam}",
                     f"expected fractions of the frame with top + height <= 1, left + width <= 1, got {region}")
        for name in ("group_norm_groups", "backbone_width", "proprio_dim", "proprio_hidden",
                     "num_tasks", "task_embed_dim", "state_dim", "object_hidden"):
            _require(getattr(self, name) >= 1, f"{w}.{name}", f"expected a positive integer, got {getattr(self, name)}")
        _require(self.object_slots >= 0, f"{w}.object_slots", f"expected >= 0 (0 = no object poses), "
                 f"got {self.object_slots}")


@dataclass
class BasisConfig:
    """State-adaptive skill basis W(s) -> B(s) by signed thin QR (eq. 2, 12-16)."""

    kind: str = "adaptive"  # "adaptive" (SMP), "fixed" (learned global B, Table 7), "pca" (Table 7)
    hidden: tuple[int, ...] = (256, 256)

    def __post_init__(self) -> None:
        _require(self.kind in ("adaptive", "fixed", "pca"), "model.basis.kind",
                 f"expected 'adaptive', 'fixed' or 'pca', got {self.kind!r}")
        _require(all(h >= 1 for h in self.hidden), "model.basis.hidden", f"expected positive widths, got {self.hidden}")


@dataclass
class GateConfig:
    """Dirichlet gates, sticky Dirichlet-Markov prior and router (eq. 3, 8, 37-40; C.1 defaults)."""

    sticky: bool = True  # False: Table 7 'W/o sticky gate' (feed-forward gates, no prior KL terms)
    alpha: float = 2.0  # global-usage diffuseness, theta ~ Dir(alpha 1)
    alpha0: float = 0.5  # anchor strength toward theta
    kappa: float = 20.0  # temporal stickiness
    kappa_start: float = 1.0  # annealed from this value to kappa (A.4 practical note i)
    kappa_anneal_steps: int = 2000
    alpha0_warm_start: float = 2.0  # alpha0 starts here and decays to alpha0 (A.4 practical note ii)
    alpha0_warm_steps: int = 1000
    align_temperature: float = 1.0  # < 1 sharpens beta_hat inside L_align (A.4 note iii); 1 = off
    hidden: tuple[int, ...] = (256, 256)
    min_concentration: float = 1e-2  # softplus floor keeps every Dirichlet parameter strictly positive
    # g_t in the reconstruction a_rec = B (g_t ⊙ z_rec) (eq. 7, 35): "sample" = a reparameterised draw
    # g_t ~ q(g_t | s_t, a_t) as the equations write it; "mean" = E_q[g_t], with which
    # a_rec = B (E/(E + eps) ⊙ B^T a) no longer depends on the gates (docs/RESULTS.md, gate findings).
    recon_gate: str = "sample"
    # Total concentration sum_i beta_hat_i of the amortizer q(g_t | s_t, a_t): 0 = learned (the paper);
    # > 0 = fixed, the amortizer choosing only the gate means. With a sampled g_t the reconstruction's
    # variance term sum_i u_i^2 Var(g_i) / E_i^2 (u = B^T a) can otherwise be removed by driving the
    # concentration up (measured: ~8,000), which leaves the means free; at a fixed total it is removed
    # only by gate means that follow the action energy per basis direction (docs/RESULTS.md).
    posterior_total: float = 20.0  # about the sticky prior's kappa + alpha0
    # The gate the experts' coefficients are divided by (eq. 34, z = B^T a / (g + eps)), i.e. what they are
    # trained to produce: "posterior" = E_q[g_t | s_t, a_t], as the paper writes it; "router" = the router's
    # sg(E[g_t | s_t]), the gate that multiplies them again at inference (a = B (g_bar ⊙ z), Algorithm 2),
    # so that a router that differs from the posterior no longer rescales every decoded coefficient
    # (docs/POLICY.md, "Coefficient gate"; the ablation in docs/RESULTS.md). The reconstruction (eq. 35)
    # keeps the posterior either way.
    coefficient_gate: str = "posterior"

    def __post_init__(self) -> None:
        w = "model.gate"
        _require(self.posterior_total >= 0, f"{w}.posterior_total", f"expected >= 0 (0 = learned), "
                 f"got {self.posterior_total}")
        _require(self.coefficient_gate in ("posterior", "router"), f"{w}.coefficient_gate",
                 f"expected 'posterior' or 'router', got {self.coefficient_gate!r}")
        _require(self.recon_gate in ("sample", "mean"), f"{w}.recon_gate",
                 f"expected 'sample' or 'mean', got {self.recon_gate!r}")
        for name in ("alpha", "alpha0", "kappa_start", "min_concentration"):
            _require(getattr(self, name) > 0, f"{w}.{name}", f"expected > 0, got {getattr(self, name)}")
        _require(self.kappa >= 0, f"{w}.kappa", f"expected >= 0, got {self.kappa}")
        _require(0 < self.align_temperature <= 1.0, f"{w}.align_temperature",
                 f"expected in (0, 1], got {self.align_temperature}")
        _require(self.kappa_anneal_steps >= 0 and self.alpha0_warm_steps >= 0, w, "anneal step counts must be >= 0")


@dataclass
class ExpertConfig:
    """One diffusion expert: a Diffusion-Policy conditional 1-D UNet over its coefficient sequence."""

    down_dims: tuple[int, ...] = (64, 128, 256)
    kernel_size: int = 5
    n_groups: int = 8
    step_embed_dim: int = 64
    # How eq. 36's per-expert denoising errors are summed: "uniform" (the paper: every expert on every
    # sample) or "gate": expert i's error weighted by K sg(g_i), g the gate its target is divided by
    # (model.gate.coefficient_gate), so each expert spends its capacity where it carries the action
    # (docs/POLICY.md, "Coefficient loss weight"; the measurement in docs/RESULTS.md 2h).
    loss_weight: str = "uniform"
    # Each expert also reads its own coordinate of the measured configuration, b_i(s)^T q_t divided like
    # its target (SMPPolicy.expert_anchor), as a second input channel, so that it can start its chunk
    # where the arms are as the dense policy does from q_t in its state. Not in the paper: off by default
    # (docs/POLICY.md, "Expert anchor"; the ablation in docs/RESULTS.md).
    anchor: bool = False

    def __post_init__(self) -> None:
        w = "model.expert"
        _require(self.loss_weight in ("uniform", "gate"), f"{w}.loss_weight",
                 f"expected 'uniform' or 'gate', got {self.loss_weight!r}")
        _require(len(self.down_dims) >= 1 and all(d >= 1 for d in self.down_dims), f"{w}.down_dims",
                 f"expected positive widths, got {self.down_dims}")
        _require(self.kernel_size % 2 == 1, f"{w}.kernel_size", f"expected an odd size, got {self.kernel_size}")
        _require(all(d % self.n_groups == 0 for d in self.down_dims), f"{w}.n_groups",
                 f"every width in down_dims {self.down_dims} must be divisible by n_groups={self.n_groups}")


@dataclass
class SchedulerConfig:
    """DDPM training / DDIM sampling (squared-cosine schedule)."""

    train_steps: int = 100
    inference_steps: int = 10
    beta_schedule: str = "squaredcos_cap_v2"
    prediction: str = "epsilon"  # eq. 36 trains epsilon
    clip_sample: float = 0.0  # 0 = no clipping of the predicted clean sample

    def __post_init__(self) -> None:
        w = "model.scheduler"
        _require(self.train_steps >= 2, f"{w}.train_steps", f"expected >= 2, got {self.train_steps}")
        _require(1 <= self.inference_steps <= self.train_steps, f"{w}.inference_steps",
                 f"expected 1..train_steps ({self.train_steps}), got {self.inference_steps}")
        _require(self.beta_schedule in ("squaredcos_cap_v2", "linear"), f"{w}.beta_schedule",
                 f"expected 'squaredcos_cap_v2' or 'linear', got {self.beta_schedule!r}")
        _require(self.prediction in ("epsilon", "sample"), f"{w}.prediction",
                 f"expected 'epsilon' or 'sample', got {self.prediction!r}")
        _require(self.clip_sample >= 0, f"{w}.clip_sample", f"expected >= 0, got {self.clip_sample}")


@dataclass
class SelectionConfig:
    """Adaptive expert activation (Section 4.2, Algorithm 2, A.5)."""

    mode: str = "coverage"  # "coverage" (SMP) or "topk" (Table 7 'W/o adaptive expert')
    tau_m: float = 0.95
    k: int = 4  # cap on |S| (coverage) or exact |S| (topk)
    mass: str = "quadratic"  # m_i = g_i^2 (SMP) or "linear" m_i = g_i (Table 7 ablation)
    # What an expert outside the active set contributes to a = B (g ⊙ z): "zero" (Algorithm 2 as written:
    # its coefficient is 0) or "hold": its direction keeps the measured arm joints (g_i z_i = b_i^T r, see
    # SMPPolicy.inactive_hold), so that a dropped expert means "no motion along b_i", as a zero coefficient
    # does in a motion action frame. docs/POLICY.md, "Inactive experts".
    inactive: str = "zero"

    def __post_init__(self) -> None:
        w = "model.selection"
        _require(self.mode in ("coverage", "topk"), f"{w}.mode", f"expected 'coverage' or 'topk', got {self.mode!r}")
        _require(0.0 < self.tau_m <= 1.0, f"{w}.tau_m", f"expected in (0, 1], got {self.tau_m}")
        _require(self.k >= 1, f"{w}.k", f"expected >= 1, got {self.k}")
        _require(self.mass in ("quadratic", "linear"), f"{w}.mass", f"expected 'quadratic' or 'linear', got {self.mass!r}")
        _require(self.inactive in ("zero", "hold"), f"{w}.inactive", f"expected 'zero' or 'hold', got {self.inactive!r}")


@dataclass
class ModelConfig:
    """Shape of the policy. A checkpoint carries this section; it cannot be overridden at load."""

    policy: str = "smp"  # "smp" or "dense_dp" (the Diffusion Policy baseline, one UNet over all D dims)
    action_dim: int = ACTION_DIM  # D
    num_experts: int = 8  # K
    obs_steps: int = 3  # T_o
    horizon: int = 8  # H
    sigma_a: float = 0.1  # likelihood scale of eq. 21 / 35 (sigma_a^2 << 1)
    # What a chunk's arm-joint entries are: "absolute" joint targets a_{t+h}, or "relative" offsets
    # a_{t+h} - q_t from the newest measured joint positions q_t (the policy adds q_t back when it
    # decodes). Gripper entries stay absolute widths in both. docs/POLICY.md, "Action frame".
    action_frame: str = "absolute"
    z_eps: float = 1e-3  # epsilon of eq. 34
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    basis: BasisConfig = field(default_factory=BasisConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    dense_down_dims: tuple[int, ...] = (256, 512, 1024)  # the dense baseline's UNet widths

    @property
    def offset_dims(self) -> tuple[int, ...]:
        """The action entries predicted as offsets from q_t: every entry but the grippers' under
        action_frame = "relative", none under "absolute"."""
        if self.action_frame == "absolute":
            return ()
        return tuple(i for i in range(self.action_dim) if i not in GRIPPER_INDICES)

    def __post_init__(self) -> None:
        w = "model"
        _require(self.policy in ("smp", "dense_dp"), f"{w}.policy", f"expected 'smp' or 'dense_dp', got {self.policy!r}")
        _require(self.action_dim >= 1, f"{w}.action_dim", f"expected >= 1, got {self.action_dim}")
        _require(1 <= self.num_experts <= self.action_dim, f"{w}.num_experts",
                 f"K must satisfy 1 <= K <= D={self.action_dim} (B(s) has K orthonormal columns in R^D), "
                 f"got {self.num_experts}")
        _require(self.obs_steps >= 1, f"{w}.obs_steps", f"expected >= 1, got {self.obs_steps}")
        _require(self.horizon >= 1, f"{w}.horizon", f"expected >= 1, got {self.horizon}")
        _require(self.sigma_a > 0, f"{w}.sigma_a", f"expected > 0, got {self.sigma_a}")
        _require(self.action_frame in ACTION_FRAMES, f"{w}.action_frame",
                 f"expected one of {ACTION_FRAMES}, got {self.action_frame!r}")
        _require(self.z_eps > 0, f"{w}.z_eps", f"expected > 0, got {self.z_eps}")
        _require(self.selection.k <= self.num_experts, f"{w}.selection.k",
                 f"expected <= num_experts ({self.num_experts}), got {self.selection.k}")
        levels = len(self.expert.down_dims if self.policy == "smp" else self.dense_down_dims)
        _require(self.horizon % 2 ** (levels - 1) == 0, f"{w}.horizon",
                 f"the UNet halves the horizon {levels - 1} time(s), so H must be divisible by {2 ** (levels - 1)}, "
                 f"got {self.horizon}")
        _require(all(d % self.expert.n_groups == 0 for d in self.dense_down_dims), f"{w}.dense_down_dims",
                 f"every width in {self.dense_down_dims} must be divisible by model.expert.n_groups="
                 f"{self.expert.n_groups}")
        if self.encoder.mode == "vision":
            _require(self.encoder.backbone_width % self.encoder.group_norm_groups == 0, f"{w}.encoder.backbone_width",
                     f"must be divisible by group_norm_groups={self.encoder.group_norm_groups} (GroupNorm(C // groups)), "
                     f"got {self.encoder.backbone_width}")


# --------------------------------------------------------------------------------------------
# Training (B.3)
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    steps: int = 100_000
    batch_size: int = 128  # B.3: 128 for RoboTwin-2 and real-world experiments
    segment_length: int = 4  # L consecutive control steps per trajectory segment (sticky terms need t-1)
    lr: float = 1e-5  # B.3 AdamW learning rate
    weight_decay: float = 1e-6
    betas: tuple[float, float] = (0.95, 0.999)
    warmup_steps: int = 500
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    val_fraction: float = 0.05
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 0
    num_workers: int = 0
    mixed_precision: bool = True  # bf16 autocast on CUDA
    # How a step runs, not what it computes (BENCHMARKS.md, "Training throughput"); not part of a run's
    # identity, so a resumed run may change them.
    cpu_bf16: bool = True  # bf16 autocast on CPUs with bf16 instructions (AVX512-BF16 or AMX); fp32 elsewhere
    distinct_frames: bool = True  # encode each distinct frame of a segment once (model/encoder.py)
    channels_last: bool = False  # channels-last image activations in the backbones (no gain measured on the CPU)
    model_size_frames: bool = True  # frames resized once to model.encoder.image_size, kept beside the cache
    fused_optimizer: bool = True  # AdamW's fused kernel (one pass over all parameters) on CPU and CUDA

    def __post_init__(self) -> None:
        w = "train"
        for name in ("steps", "batch_size", "segment_length", "checkpoint_every", "log_every"):
            _require(getattr(self, name) >= 1, f"{w}.{name}", f"expected >= 1, got {getattr(self, name)}")
        _require(self.lr > 0, f"{w}.lr", f"expected > 0, got {self.lr}")
        _require(0 <= self.val_fraction < 1, f"{w}.val_fraction", f"expected in [0, 1), got {self.val_fraction}")
        _require(0 <= self.ema_decay < 1, f"{w}.ema_decay", f"expected in [0, 1), got {self.ema_decay}")
        _require(self.grad_clip > 0, f"{w}.grad_clip", f"expected > 0, got {self.grad_clip}")


# --------------------------------------------------------------------------------------------
# Data (rosbag2 ingest)
# --------------------------------------------------------------------------------------------


@dataclass
class TopicMap:
    """Which bag topics feed which inputs (defaults follow the house topic conventions)."""

    cameras: dict[str, str] = field(default_factory=lambda: {c: topics.image_raw(c) for c in CAMERAS})
    joint_states: dict[str, str] = field(default_factory=lambda: {a: topics.joint_states(a) for a in ARMS})
    action: dict[str, str] = field(default_factory=lambda: {a: topics.joint_cmd(a) for a in ARMS})
    # "command": the commanded targets on `action`; "leader": the leader arms' joint states in
    # leader/follower teleoperation (point `action` at them); "next_state": the follower's next state.
    action_source: str = "command"
    task_topic: str = topics.TASK
    object_poses: str = topics.OBJECT_POSES  # smp_ros/msg/ObjectPoses, read when data.object_slots > 0
    task_source: str = "topic"  # "topic" | "metadata" | "cli"
    task_metadata_key: str = "smp_task"  # custom_data key in metadata.yaml when task_source is "metadata"
    # Per-arm joint order; a message may name them bare ("joint1") or arm-prefixed ("left_joint1").
    joint_names: tuple[str, ...] = tuple(f"joint{i}" for i in range(1, ARM_JOINTS + 1)) + ("gripper",)

    def __post_init__(self) -> None:
        w = "data.topics"
        _require(len(self.joint_names) == ARM_JOINTS + 1, f"{w}.joint_names",
                 f"expected {ARM_JOINTS + 1} names (6 joints + gripper), got {self.joint_names}")
        _require(self.action_source in ("command", "leader", "next_state"), f"{w}.action_source",
                 f"expected 'command', 'leader' or 'next_state', got {self.action_source!r}")
        _require(self.task_source in ("topic", "metadata", "cli"), f"{w}.task_source",
                 f"expected 'topic', 'metadata' or 'cli', got {self.task_source!r}")
        _require(set(self.joint_states) == set(ARMS), f"{w}.joint_states", f"expected keys {ARMS}")
        _require(set(self.action) == set(ARMS), f"{w}.action", f"expected keys {ARMS}")


@dataclass
class DataConfig:
    control_rate_hz: float = 20.0
    max_gap_s: float = 0.25  # a stream gap longer than this flags the episode
    on_bad_episode: str = "skip"  # "skip" (with a warning) or "error"
    topics: TopicMap = field(default_factory=TopicMap)
    tasks: tuple[str, ...] = TASKS
    image_size: tuple[int, int] = (128, 128)  # (height, width) frames are resized to in the cache
    min_episode_steps: int = 8  # shorter episodes (in control steps) count as bad
    # How frames of another aspect ratio than image_size are brought to it: "resize" (stretch),
    # "center_crop" (cut to the aspect ratio, then scale) or "letterbox" (scale to fit, pad black).
    image_fit: str = "resize"
    # Object poses ingested per step (0 = the topic is not read); set from model.encoder.object_slots
    # by the trainer. Which names fill the slots, per task, in order (names the tracker publishes):
    object_slots: int = 0
    task_objects: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(TASK_OBJECTS))

    def __post_init__(self) -> None:
        w = "data"
        _require(self.image_fit in ("resize", "center_crop", "letterbox"), f"{w}.image_fit",
                 f"expected 'resize', 'center_crop' or 'letterbox', got {self.image_fit!r}")
        _require(self.control_rate_hz > 0, f"{w}.control_rate_hz", f"expected > 0, got {self.control_rate_hz}")
        _require(len(self.image_size) == 2 and min(self.image_size) >= 8, f"{w}.image_size",
                 f"expected (height, width) >= 8 px, got {self.image_size}")
        _require(self.min_episode_steps >= 2, f"{w}.min_episode_steps",
                 f"expected >= 2, got {self.min_episode_steps}")
        _require(len(self.tasks) >= 1, f"{w}.tasks", "expected at least one task name")
        _require(self.max_gap_s > 0, f"{w}.max_gap_s", f"expected > 0, got {self.max_gap_s}")
        _require(self.on_bad_episode in ("skip", "error"), f"{w}.on_bad_episode",
                 f"expected 'skip' or 'error', got {self.on_bad_episode!r}")
        _require(self.object_slots >= 0, f"{w}.object_slots", f"expected >= 0, got {self.object_slots}")
        if self.object_slots:
            for task in self.tasks:
                names = self.task_objects.get(task)
                _require(names is not None, f"{w}.task_objects", f"no object list for task {task!r}")
                _require(len(names) <= self.object_slots, f"{w}.task_objects.{task}",
                         f"{len(names)} objects {list(names)} do not fit data.object_slots = {self.object_slots}")


# --------------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------------


@dataclass
class SimConfig:
    image_size: tuple[int, int] = (128, 128)  # (height, width) of every rendered camera
    cameras: tuple[str, ...] = CAMERAS
    physics_dt: float = 0.002
    control_rate_hz: float = 20.0
    feedback_rate_hz: float = 200.0  # emulated CAN feedback rate, in simulated time
    episode_steps: int = 300
    gl_backend: str = "egl"  # "egl" or "osmesa"

    def __post_init__(self) -> None:
        w = "sim"
        _require(len(self.image_size) == 2 and min(self.image_size) >= 16, f"{w}.image_size",
                 f"expected (height, width) >= 16, got {self.image_size}")
        _require(self.physics_dt > 0, f"{w}.physics_dt", f"expected > 0, got {self.physics_dt}")
        _require(self.control_rate_hz > 0 and self.feedback_rate_hz > 0, w, "rates must be > 0")
        _require(self.gl_backend in ("egl", "osmesa"), f"{w}.gl_backend",
                 f"expected 'egl' or 'osmesa', got {self.gl_backend!r}")


# --------------------------------------------------------------------------------------------
# Runtime (inference engine, chunk execution, safety)
# --------------------------------------------------------------------------------------------


@dataclass
class SafetyConfig:
    """Limits every command passes before it reaches an arm (PiPER limits from piper_sdk)."""

    joint_lower: tuple[float, ...] = (-2.6179, 0.0, -2.967, -1.745, -1.22, -2.0944)
    joint_upper: tuple[float, ...] = (2.6179, 3.14, 0.0, 1.745, 1.22, 2.0944)
    gripper_range: tuple[float, float] = (0.0, 0.07)
    max_joint_speed: float = 3.0  # rad/s
    max_joint_step: float = 0.05  # rad per command tick
    max_gripper_speed: float = 0.2  # m/s
    stale_after_s: float = 0.2  # an observation older than this is stale

    def __post_init__(self) -> None:
        w = "runtime.safety"
        _require(len(self.joint_lower) == ARM_JOINTS and len(self.joint_upper) == ARM_JOINTS, w,
                 f"joint_lower/joint_upper need {ARM_JOINTS} values")
        _require(all(lo < hi for lo, hi in zip(self.joint_lower, self.joint_upper)), w,
                 "every joint_lower must be below its joint_upper")
        _require(self.gripper_range[0] < self.gripper_range[1], f"{w}.gripper_range", "expected (min, max), min < max")
        for name in ("max_joint_speed", "max_joint_step", "max_gripper_speed", "stale_after_s"):
            _require(getattr(self, name) > 0, f"{w}.{name}", f"expected > 0, got {getattr(self, name)}")


@dataclass
class RuntimeConfig:
    backend: str = "compiled"  # one of BACKENDS
    device: str = "auto"  # one of DEVICES
    # Inference calls (new chunks) per second. 5 Hz executes 4 steps of each 16-step chunk at the 20 Hz control
    # rate: on the shipped vision model 0.66 / 0.70 against 0.57 at 10 Hz (240 paired harness episodes, McNemar
    # p = 0.002), and on the object-pose track both SMP and Diffusion Policy gain too (docs/RESULTS.md 2m, 3h).
    policy_rate_hz: float = 5.0
    command_rate_hz: float = 100.0
    # What paces the command ticks: "thread" = a thread of the policy node's own, sleeping to absolute
    # deadlines on the node's clock (ROS time too); "executor" = a ROS timer dispatched by the executor
    # to its thread pool, beside every sensor callback (BENCHMARKS.md, "Soak": the jitter of each).
    command_clock: str = "thread"
    # Real-time priority of the command clock thread: 0 = the OS's default scheduling; 1-99 = SCHED_FIFO at
    # that priority (Linux; needs root, CAP_SYS_NICE or an rtprio limit, else a warning and the default),
    # so that the other processes on its core (a simulator, a trainer) cannot delay a tick.
    command_priority: int = 0
    # How consecutive chunks are joined: "splice" | "ensemble" | "none" (runtime/executor.py). Splice
    # follows a new plan in ~0.15 s, the ensemble in ~0.6 s but smoother (BENCHMARKS.md, executor).
    chunk_blend: str = "splice"
    ensemble_decay: float = 0.0  # ACT weight exp(-decay * n) per chunk; > 0 favours older plans
    blend_window_s: float = 0.1  # fade-in / cross-fade window of a new chunk (BENCHMARKS.md)
    threads: int = 0  # torch intra-op threads on the CPU; 0 = all cores the process may use
    # Run the model in a worker process (runtime/worker.py): on a CPU shared with other Python threads
    # (a simulator in the same process) that keeps torch's per-operator GIL hand-overs from stalling.
    inference_process: bool = False
    sync_slop_s: float = 0.05
    task: str = TASKS[0]
    # (height, width) of the camera frames the model will receive. The engine's warmup compiles for
    # it, so the first real frame does not trigger a recompilation; (0, 0) = the model's image size.
    camera_size: tuple[int, int] = (0, 0)
    safety: SafetyConfig = field(default_factory=SafetyConfig)

    def __post_init__(self) -> None:
        w = "runtime"
        _require(self.backend in BACKENDS, f"{w}.backend", f"expected one of {BACKENDS}, got {self.backend!r}")
        _require(self.device in DEVICES, f"{w}.device", f"expected one of {DEVICES}, got {self.device!r}")
        _require(self.policy_rate_hz > 0 and self.command_rate_hz >= self.policy_rate_hz, w,
                 "need command_rate_hz >= policy_rate_hz > 0")
        _require(self.command_clock in COMMAND_CLOCKS, f"{w}.command_clock",
                 f"expected one of {COMMAND_CLOCKS}, got {self.command_clock!r}")
        _require(0 <= self.command_priority <= 99, f"{w}.command_priority",
                 f"expected 0 (default scheduling) or a SCHED_FIFO priority 1-99, got {self.command_priority}")
        _require(self.command_priority == 0 or self.command_clock == "thread", f"{w}.command_priority",
                 f"a real-time priority needs command_clock 'thread', got {self.command_clock!r}")
        _require(self.chunk_blend in ("ensemble", "splice", "none"), f"{w}.chunk_blend",
                 f"expected 'ensemble', 'splice' or 'none', got {self.chunk_blend!r}")
        _require(self.sync_slop_s > 0, f"{w}.sync_slop_s", f"expected > 0, got {self.sync_slop_s}")
        _require(self.blend_window_s >= 0, f"{w}.blend_window_s", f"expected >= 0, got {self.blend_window_s}")
        _require(self.threads >= 0, f"{w}.threads", f"expected >= 0 (0 = all cores), got {self.threads}")
        _require(self.task in TASKS, f"{w}.task", f"expected one of {TASKS}, got {self.task!r}")
        _require(len(self.camera_size) == 2 and (tuple(self.camera_size) == (0, 0) or min(self.camera_size) >= 8),
                 f"{w}.camera_size", f"expected (height, width) >= 8 px, or (0, 0), got {self.camera_size}")

    def frame_size(self, model_image_size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of the frames the cameras deliver: ``camera_size``, or the model's image size
        when it is (0, 0). The engine warms up on frames of this size; the policy refuses others."""
        size = tuple(int(v) for v in self.camera_size)
        return size if size != (0, 0) else tuple(int(v) for v in model_image_size)


# --------------------------------------------------------------------------------------------
# Root
# --------------------------------------------------------------------------------------------


@dataclass
class SMPConfig:
    preset: str = "sim"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        # A frame that reaches the encoder at exactly image_size is taken as already cut to its region and
        # resized (the training cache's frames, model.encoder.to_model_input), so a region needs the
        # recorded and rendered frames to be of another size.
        enc = self.model.encoder
        if enc.camera_regions:
            for where, size in (("data.image_size", self.data.image_size), ("sim.image_size", self.sim.image_size)):
                _require(tuple(size) != tuple(enc.image_size), where,
                         f"model.encoder.camera_regions needs frames of another size than model.encoder.image_size "
                         f"{tuple(enc.image_size)}, got {tuple(size)}")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "SMPConfig":
        return _from_plain(cls, data, where)

    def with_overrides(self, overrides: Mapping[str, Any], where: str = "overrides") -> "SMPConfig":
        """A new config with ``overrides`` applied: the one way settings are layered on a config (YAML
        overlays, model-load overrides, ROS parameters). Keys are nested mappings (any subset of the
        tree, as an overlay file writes it) or dotted names (``"runtime.safety.max_joint_step"``, as
        ROS parameters are named), or both; values replace, mappings merge. The result is validated
        like any config: an unknown key or a bad value raises ``ConfigError`` naming it and ``where``."""
        return SMPConfig.from_dict(merge(self.to_dict(), unflatten(overrides)), where=where)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SMPConfig":
        data = load_yaml_mapping(path)
        try:
            return cls.from_dict(data, where=str(path))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def load_yaml_mapping(path: str | Path, what: str = "file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping; errors name the file and what is wrong with it."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted names (``{"safety": {"stale_after_s": 1}}`` -> ``{"safety.stale_after_s": 1}``),
    exactly as rcl names the parameters of a nested parameters-file block."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def unflatten(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted names (and nested mappings) -> one nested mapping; the inverse of :func:`flatten`."""
    nested: dict[str, Any] = {}
    for name, value in mapping.items():
        *parents, leaf = str(name).split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(value, Mapping):
            node[leaf] = merge(node.get(leaf, {}), unflatten(value))
        else:
            node[leaf] = value
    return nested


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` layered on ``base``: its values replace, mappings merge key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(base[key], value) if isinstance(value, Mapping) and isinstance(base.get(key), Mapping) \
            else value
    return out


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def _from_plain(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _from_plain(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(hint)
        return {str(k): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def _tiny() -> SMPConfig:
    """Seconds on a CPU: the unit tests' model."""
    model = ModelConfig(
        num_experts=4, obs_steps=2, horizon=8,
        encoder=EncoderConfig(mode="lowdim", proprio_hidden=32, task_embed_dim=8, state_dim=32),
        basis=BasisConfig(hidden=(32,)),
        gate=GateConfig(hidden=(32,), kappa_anneal_steps=50, alpha0_warm_steps=25),
        expert=ExpertConfig(down_dims=(16, 32), n_groups=4, step_embed_dim=16),
        scheduler=SchedulerConfig(train_steps=100, inference_steps=10),
        selection=SelectionConfig(k=3),
        dense_down_dims=(32, 64),
    )
    train = TrainConfig(steps=300, batch_size=16, lr=1e-3, warmup_steps=10, checkpoint_every=100,
                        log_every=10, ema_decay=0.9)
    return SMPConfig(preset="tiny", model=model, train=train)


def _sim() -> SMPConfig:
    """The CPU demo model shipped in models/ (<= 25 MB of weights, about 19 MB).

    Two cameras at 64x64 through quarter-width ResNet-18s (w = 16, 128-d features each) and
    quarter-width experts keep a training step at batch 32 practical on two CPU cores.
    """
    model = ModelConfig(
        num_experts=8, obs_steps=2, horizon=16,
        encoder=EncoderConfig(mode="vision", cameras=("cam_high", "cam_left_wrist"), image_size=(64, 64),
                              backbone_width=16, proprio_hidden=64, task_embed_dim=16, state_dim=128),
        basis=BasisConfig(hidden=(256,)),
        gate=GateConfig(hidden=(256,)),
        expert=ExpertConfig(down_dims=(16, 32, 64), n_groups=8, step_embed_dim=32),
        scheduler=SchedulerConfig(train_steps=100, inference_steps=10),
        dense_down_dims=(64, 128, 256),
    )
    train = TrainConfig(steps=20_000, batch_size=64, lr=3e-4, warmup_steps=200)
    return SMPConfig(preset="sim", model=model, train=train)


def _paper() -> SMPConfig:
    """B.3 / Table 6 scale: K=8, T_o=3, H=8, about 259 M parameters.

    Table 6's 11.2 M vision encoder is one ResNet-18, so this preset uses one camera; every further
    camera adds another 11.2 M. Module sizes: encoder 11.8 M, gate 3.6 M, basis 12.5 M, one expert
    28.9 M (UNet widths 160/320/640: the Diffusion Policy UNet with reduced widths, as B.3 says).
    """
    model = ModelConfig(
        num_experts=8, obs_steps=3, horizon=8,
        encoder=EncoderConfig(mode="vision", cameras=("cam_high",), image_size=(96, 96), state_dim=256),
        basis=BasisConfig(hidden=(3350, 3350)),
        gate=GateConfig(hidden=(1200, 1200)),
        expert=ExpertConfig(down_dims=(160, 320, 640), n_groups=8, step_embed_dim=256),
        scheduler=SchedulerConfig(train_steps=100, inference_steps=10),
        dense_down_dims=(512, 1024, 2048),
    )
    train = TrainConfig(steps=300_000, batch_size=128, lr=1e-5)
    return SMPConfig(preset="paper", model=model, train=train)


def _sim_state() -> SMPConfig:
    """The object-pose track: joint states + tracked object poses + task, no cameras (a tracker's topic
    on a real robot, the simulator's in simulation). Sized for experiments in minutes on a CPU: about
    0.13 s per step on one core of a lightly loaded 2-core VM, 6.5 min for the 3,000 steps, by which
    the held-out gate metrics have settled (docs/RESULTS.md)."""
    steps = 3000
    model = ModelConfig(
        num_experts=8, obs_steps=2, horizon=16,
        encoder=EncoderConfig(mode="lowdim", object_slots=OBJECT_SLOTS, proprio_hidden=64, object_hidden=64,
                              task_embed_dim=16, state_dim=128),
        basis=BasisConfig(hidden=(128,)),
        gate=GateConfig(hidden=(128,), kappa_anneal_steps=steps // 3, alpha0_warm_steps=steps // 6),
        expert=ExpertConfig(down_dims=(16, 32), n_groups=8, step_embed_dim=32),
        scheduler=SchedulerConfig(train_steps=100, inference_steps=10),
        dense_down_dims=(64, 128),  # the dense baseline at about SMP's total parameters (1.22 M vs 1.18 M)
    )
    train = TrainConfig(steps=steps, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.995,
                        checkpoint_every=500, log_every=50, val_fraction=0.1)
    return SMPConfig(preset="sim_state", model=model, train=train)


PRESETS = {"tiny": _tiny, "sim": _sim, "sim_state": _sim_state, "paper": _paper}


def preset(name: str) -> SMPConfig:
    """A fresh config tree for a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


def parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs (values read as YAML: 0.99, 8, topk) into a load-time overrides mapping."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. model.selection.tau_m=0.99")
        out[key.strip()] = yaml.safe_load(value)
    return out
