"""SMP policy (Section 4, Algorithms 1 and 2) and the dense Diffusion Policy baseline.

Notation (code name -> paper symbol, equation)

    s            s_t, state feature (encoder.py)
    Bm           B(s_t) in R^{D x K}, orthonormal skill basis (eq. 2, 16); one B(s_t) decodes the whole
                 chunk predicted at t
    a            a_t: the normalized action chunk (N, H, D), a_h = B (g ⊙ z_h)  (eq. 1)
    beta_hat     q(g_t | s_t, a_t) = Dir(beta_hat_t) (eq. 8)
    E_g          E_q[g_t]
    u            B^T a_h per chunk position (N, H, K)
    z_sg, z_rec  hat z^sg_{0,t}, hat z^rec_{0,t} (eq. 7, 34), eps = model.z_eps
    a_rec        hat a^rec_t = B (g ⊙ z_rec) (eq. 7, 35)
    g_bar        E[g_t | s_t] from the router (Algorithm 2)
    active       S_t as a (B, K) mask (Section 4.2)

The training objective (Algorithm 1), how its terms are reduced, and the choices the paper leaves
open (and why they were made so): docs/POLICY.md.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from smp_ros.config import ARM_JOINT_INDICES, ModelConfig, SelectionConfig
from smp_ros.model import batch as keys
from smp_ros.model.basis import SkillBasis
from smp_ros.model.encoder import ObservationEncoder
from smp_ros.model.experts import StackedUnet1D
from smp_ros.model.gates import DirichletGates, dirichlet_mean
from smp_ros.model.normalizer import Normalizer
from smp_ros.model.scheduler import DiffusionScheduler
from smp_ros.model.selection import select_experts

FRAME_INDEX = "frame_index"  # flattened training segments only: (N, T_o) rows of each window's frames
# Stages of one Algorithm 2 call, as ``PolicyOutput.timings`` and the inference engine name them.
STAGES = ("encoder", "router_select", "basis", "denoise", "decode")


@dataclass
class PolicyOutput:
    action: torch.Tensor  # (B, H, D) raw SI units
    gate: torch.Tensor  # (B, K) router mean g_bar
    active: torch.Tensor  # (B, K) bool, the active set S
    coverage: torch.Tensor  # (B,) mass share of S
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    experts: torch.Tensor | None = None  # (E,) indices of the experts run (the union of the batch's S)


@dataclass(frozen=True)
class Stages:
    """The callables one Algorithm 2 call runs. ``policy.stages()`` are the policy's own (eager); the
    inference engine passes its backend's (compiled, exported or TensorRT expert networks)."""

    encode: Callable[[Mapping[str, torch.Tensor]], torch.Tensor]  # obs -> s (B, d_s)
    route: Callable[[torch.Tensor], torch.Tensor] | None  # s -> g_bar (B, K); SMP only
    basis: Callable[[torch.Tensor], torch.Tensor] | None  # s -> B(s) (B, D, K); SMP only
    denoise: Callable[..., torch.Tensor]  # (x (B, E, C, H) noise, s, experts (E,), anchor (B, E) or None) -> x_0


class StageClock:
    """Per-stage time that adds no host-device sync between stages.

    On the CPU a stage's time is the ``perf_counter`` difference around it. On CUDA kernels run
    asynchronously, so a host timer would measure launch time only; instead each stage boundary
    records a CUDA event on the current stream and the elapsed times are read afterwards
    (:meth:`seconds`), at the one synchronisation the caller already pays to read the result."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, Any, Any]] = []

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = self._now()
        yield
        self._marks.append((name, start, self._now()))

    def seconds(self) -> dict[str, float]:
        """Stage name -> seconds (a name used twice adds up); on CUDA this waits for the last stage."""
        out: dict[str, float] = {}
        if self.cuda and self._marks:
            self._marks[-1][2].synchronize()
        for name, start, end in self._marks:
            dt = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            out[name] = out.get(name, 0.0) + dt
        return out


class _PolicyBase(nn.Module):
    """Shared input handling: validation, normalization, encoding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.normalizer = Normalizer(cfg.action_dim, cfg.encoder.object_slots * 7)
        # 1 at the entries the chunk holds as offsets from q_t (model.action_frame), 0 elsewhere; derived
        # from the config, so not saved with the weights.
        offset = torch.zeros(cfg.action_dim)
        offset[list(cfg.offset_dims)] = 1.0
        self.register_buffer("offset_mask", offset, persistent=False)
        self.encoder = ObservationEncoder(cfg)
        self.scheduler = DiffusionScheduler(cfg.scheduler)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def set_normalizer(self, stats: Mapping[str, Any]) -> None:
        """Fit the normalizer from dataset statistics (format in normalizer.py)."""
        self.normalizer.set_stats(stats)

    def set_inference_steps(self, steps: int) -> None:
        self.scheduler.set_timesteps(steps)

    # ---- action frame (model.action_frame) -----------------------------------------------------------

    def chunk_target(self, action: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
        """The normalized chunk the policy models: demonstrated absolute targets (..., H, D) and the
        window's joint positions (..., T_o, D), raw units -> normalize(a_{t+h} - m ⊙ q_t), with q_t the
        newest observation and m the offset mask (all zeros for absolute actions)."""
        return self.normalizer.normalize("action", action.float() - self.offset_mask * qpos[..., -1:, :].float())

    def absolute_chunk(self, chunk: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
        """The inverse after un-normalizing: a chunk (B, H, D) in the model's frame, raw units -> absolute
        targets a_{t+h} = chunk_h + m ⊙ q_t, with q_t the newest of qpos (B, T_o, D)."""
        return chunk + self.offset_mask * qpos[:, -1:, :].to(chunk.dtype)

    # ---- validation ------------------------------------------------------------------------------

    def _check(self, data: Mapping[str, torch.Tensor], segment: bool) -> None:
        cfg, where = self.cfg, ("batch" if segment else "obs")
        lead = 2 if segment else 1
        lead_txt = "(B, L, " if segment else "(B, "
        need = [keys.QPOS, keys.TASK] + ([keys.ACTION] if segment else [])
        if cfg.encoder.mode == "vision":
            need.append(keys.IMAGES)
        if cfg.encoder.object_slots:
            need.append(keys.OBJECTS)
        for k in need:
            if k not in data:
                raise KeyError(f"{where}: missing key {k!r}; expected keys {need}")
        q = data[keys.QPOS]
        if q.dim() != lead + 2 or q.shape[lead:] != (cfg.obs_steps, cfg.action_dim):
            raise ValueError(f"{where}[{keys.QPOS!r}]: expected shape {lead_txt}T_o={cfg.obs_steps}, "
                             f"D={cfg.action_dim}), got {tuple(q.shape)}")
        t = data[keys.TASK]
        if t.dim() != 1 or t.shape[0] != q.shape[0] or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{where}[{keys.TASK!r}]: expected int64 shape (B,)=({q.shape[0]},), "
                             f"got {t.dtype} {tuple(t.shape)}")
        if t.device.type == "cpu" and t.numel() and (t.min() < 0 or t.max() >= cfg.encoder.num_tasks):
            raise ValueError(f"{where}[{keys.TASK!r}]: task ids must be in 0..{cfg.encoder.num_tasks - 1}, "
                             f"got {t.tolist()}")
        if segment:
            a = data[keys.ACTION]
            if a.shape != (*q.shape[:2], cfg.horizon, cfg.action_dim):
                raise ValueError(f"{where}[{keys.ACTION!r}]: expected shape (B, L, H={cfg.horizon}, "
                                 f"D={cfg.action_dim}) = {(*q.shape[:2], cfg.horizon, cfg.action_dim)}, "
                                 f"got {tuple(a.shape)}")
        if cfg.encoder.object_slots:
            o, n_obj = data[keys.OBJECTS], cfg.encoder.object_slots * 7
            if o.shape != (*q.shape[:lead], cfg.obs_steps, n_obj):
                raise ValueError(f"{where}[{keys.OBJECTS!r}]: expected shape {lead_txt}T_o={cfg.obs_steps}, "
                                 f"{n_obj}) (object_slots={cfg.encoder.object_slots} poses of 7), got {tuple(o.shape)}")
        if cfg.encoder.mode == "vision":
            im = data[keys.IMAGES]
            n_cam = len(cfg.encoder.cameras)
            if im.dtype != torch.uint8 or im.dim() != lead + 5 or im.shape[:lead + 2] != \
                    (*q.shape[:lead], cfg.obs_steps, n_cam) or im.shape[-1] != 3:
                raise ValueError(f"{where}[{keys.IMAGES!r}]: expected uint8 {lead_txt}T_o={cfg.obs_steps}, "
                                 f"N_cam={n_cam}, H, W, 3) with cameras {cfg.encoder.cameras}, "
                                 f"got {im.dtype} {tuple(im.shape)}")

    def _require_normalizer(self) -> None:
        if not self.normalizer.fitted:
            raise RuntimeError("policy normalizer is not fitted: call set_normalizer(stats) with dataset "
                               "statistics (or load a model directory with its normalizer.json)")

    def encode(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Stage 1: raw observation (B, T_o, ...) -> s (B, d_s). Training's flattened segments may carry
        distinct frames and a ``frame_index`` instead (``_flatten_segments``)."""
        qpos = self.normalizer.normalize("qpos", obs[keys.QPOS].float())
        objects = None
        if self.cfg.encoder.object_slots:
            objects = self.normalizer.normalize("objects", obs[keys.OBJECTS].float())
        return self.encoder(qpos, obs.get(keys.IMAGES), obs[keys.TASK].long(), objects=objects,
                            frame_index=obs.get(FRAME_INDEX))

    @torch.no_grad()
    def predict_action(self, obs: Mapping[str, torch.Tensor], generator: torch.Generator | None = None,
                       active: Any = None) -> PolicyOutput:
        """Algorithm 2 on raw observations (B, T_o, ...) -> PolicyOutput (action (B, H, D) raw units), run
        with the policy's own stages; ``active`` forces the active set (SMP)."""
        self._check(obs, segment=False)
        self._require_normalizer()
        clock = StageClock(self.device)
        out = self.algorithm2(obs, self.stages(), clock, generator, active)
        out.timings = clock.seconds()
        out.timings["total"] = sum(out.timings.values())
        return out

    # Encode each distinct frame of a segment once (encoder.py, "Shared frames"). Set by the trainer
    # (train.distinct_frames), whose batches are the dataset's segments of consecutive windows; off, every
    # window's T_o frames are encoded separately, which any batch allows.
    distinct_frames: bool = False

    def _flatten_segments(self, batch: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int, int]:
        """Training batch (B, L, ...) -> observation dict over N = B*L control steps.

        Window l of a segment holds the frames of steps l - T_o + 1 .. l (clamped at the episode start), so
        its frame j is the segment's distinct frame m = l + j of L + T_o - 1. With ``distinct_frames`` the
        observation carries those frames (B*(L+T_o-1), N_cam, H, W, 3) and ``frame_index`` (B*L, T_o).
        On the CPU the structure is checked (frame j + 1 of window l equals frame j of window l + 1: a byte
        comparison, far cheaper than a backbone pass); on an accelerator it is not, since reading the
        result back would synchronise every step."""
        Bn, L = batch[keys.QPOS].shape[:2]
        obs = {keys.QPOS: batch[keys.QPOS].flatten(0, 1),  # (B*L, T_o, D)
               keys.TASK: batch[keys.TASK].repeat_interleave(L)}  # (B*L,)
        if keys.IMAGES in batch and self.cfg.encoder.mode == "vision":
            images = batch[keys.IMAGES]  # (B, L, T_o, N_cam, H, W, 3)
            T = images.shape[2]
            if self.distinct_frames and L > 1 and T > 1:
                if images.device.type == "cpu" and not torch.equal(images[:, 1:, :-1], images[:, :-1, 1:]):
                    raise ValueError(f"batch[{keys.IMAGES!r}]: with distinct_frames the L windows of a segment must "
                                     "be consecutive control steps (frame j + 1 of window l equal to frame j of "
                                     "window l + 1); these are not. Build batches with data.dataset.SegmentDataset "
                                     "or set policy.distinct_frames = False")
                frames = torch.cat([images[:, 0], images[:, 1:, -1]], dim=1)  # (B, L+T_o-1, N_cam, H, W, 3)
                M = L + T - 1
                window = torch.arange(L, device=images.device)[:, None] + torch.arange(T, device=images.device)
                index = torch.arange(Bn, device=images.device)[:, None, None] * M + window  # (B, L, T_o)
                obs[keys.IMAGES] = frames.flatten(0, 1)  # (B*(L+T_o-1), N_cam, H, W, 3)
                obs[FRAME_INDEX] = index.flatten(0, 1)  # (B*L, T_o)
            else:
                obs[keys.IMAGES] = images.flatten(0, 1)  # (B*L, T_o, N_cam, H, W, 3)
        if keys.OBJECTS in batch and self.cfg.encoder.object_slots:
            obs[keys.OBJECTS] = batch[keys.OBJECTS].flatten(0, 1)  # (B*L, T_o, O)
        return obs, Bn, L


class SMPPolicy(_PolicyBase):
    """Skill Mixture-of-Experts diffusion policy."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.policy != "smp":
            raise ValueError(f"model.policy: SMPPolicy needs 'smp', got {cfg.policy!r} (use build_policy)")
        super().__init__(cfg)
        self.selection: SelectionConfig = cfg.selection
        self.basis = SkillBasis(cfg)
        self.gates = DirichletGates(cfg)
        e = cfg.expert
        self.experts = StackedUnet1D(cfg.num_experts, 1, cfg.encoder.state_dim, e.down_dims, e.kernel_size,
                                     e.n_groups, e.step_embed_dim, input_asinh=True, anchor=e.anchor)
        # x = z / z_scale is what the experts diffuse (docs/POLICY.md, "Scale of the diffusion variable").
        # 0 = not fitted yet; persistent, so it travels with the weights. Model files written before it
        # existed diffused z unscaled and load with 1 (checkpoint.py).
        self.register_buffer("z_scale", torch.zeros(()))
        self._z_scale_fitted = False  # host-side mirror of z_scale > 0, so training steps need no device read
        self.register_load_state_dict_post_hook(_mirror_z_scale)

    # ---- training (Algorithm 1) ------------------------------------------------------------------

    def compute_loss(self, batch: Mapping[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """batch: segments (B, L, ...) raw units (docs/ARCHITECTURE.md) -> {loss, coeff, recon, gate, align}."""
        self._check(batch, segment=True)
        self._require_normalizer()
        cfg = self.cfg
        obs, Bn, L = self._flatten_segments(batch)
        s = self.encode(obs)  # (N, d_s), N = B*L
        a = self.chunk_target(batch[keys.ACTION], batch[keys.QPOS]).flatten(0, 1)  # (N, H, D)
        Bm = self.basis(s)  # (N, D, K)

        beta_hat = self.gates.posterior(s, a)  # (N, K)
        self.last_beta_hat = beta_hat  # for diagnostics of what each term does to the gates (gate_probe.py)
        beta_router = self.gates.router(s)  # (N, K)
        E_g = dirichlet_mean(beta_hat)
        z_sg = self.coefficient_target(a, Bm.detach(), E_g, beta_router)  # (N, H, K), eq. 34 with sg(B)
        z_rec = (a @ Bm) / (E_g + cfg.z_eps).unsqueeze(1)  # (N, H, K), eq. 34
        g = E_g if cfg.gate.recon_gate == "mean" else self.gates.sample(beta_hat)  # g_t of eq. 35
        a_rec = (g.unsqueeze(1) * z_rec) @ Bm.transpose(-1, -2)  # (N, H, D), eq. 35
        recon = (a - a_rec).pow(2).sum((-1, -2)) / (2 * cfg.sigma_a ** 2)  # (N,)

        if not self._z_scale_fitted:  # data-dependent initialisation, once (trainer: fit_z_scale first)
            self._set_z_scale(z_sg)
        x0 = (z_sg / self.z_scale).transpose(1, 2).unsqueeze(2)  # (N, K, 1, H): expert i's own sequence
        noise = torch.randn_like(x0)
        tau = self.scheduler.sample_timesteps(x0.shape[:2], x0.device)  # (N, K): each expert its own tau
        anchor = self.expert_anchor(obs[keys.QPOS], Bm, dirichlet_mean(beta_router)) if cfg.expert.anchor else None
        pred = self.experts(self.scheduler.add_noise(x0, noise, tau), tau, s, self.experts.all_experts(s.device),
                            anchor)
        coeff = (pred - self.scheduler.training_target(x0, noise)).pow(2).sum((2, 3))  # (N, K), eq. 36 per expert
        if cfg.expert.loss_weight == "gate":  # K sg(g_i): the weights sum to K, as the uniform sum's do
            coeff = coeff * (cfg.num_experts * self.coefficient_gate(E_g, beta_router).detach())
        coeff = coeff.sum(1)  # (N,)

        K = cfg.num_experts
        beta_seg = beta_hat.reshape(Bn, L, K)
        gate = self.gates.gate_loss(beta_seg, step)  # (B,)
        align = self.gates.align_loss(beta_seg, beta_router.reshape(Bn, L, K))  # (B,)
        terms = {"coeff": coeff.reshape(Bn, L).sum(1).mean(), "recon": recon.reshape(Bn, L).sum(1).mean(),
                 "gate": gate.mean(), "align": align.mean()}
        return {"loss": terms["coeff"] + terms["recon"] + terms["gate"] + terms["align"], **terms}

    def coefficient_target(self, a: torch.Tensor, Bm: torch.Tensor, E_g: torch.Tensor,
                           beta_router: torch.Tensor) -> torch.Tensor:
        """What the experts are trained to produce, z = B^T a / (g + eps) (eq. 34): a (N, H, D) normalized
        chunk, Bm (N, D, K), E_g = E_q[g | s, a] (N, K), beta_router the router's Dirichlet parameters (N, K)
        -> (N, H, K). g is E_q[g] (model.gate.coefficient_gate = "posterior", the paper) or the router's
        sg(E[g | s]) ("router", the gate Algorithm 2 multiplies the sampled coefficients by)."""
        return (a @ Bm) / (self.coefficient_gate(E_g, beta_router) + self.cfg.z_eps).unsqueeze(1)

    def coefficient_gate(self, E_g: torch.Tensor, beta_router: torch.Tensor) -> torch.Tensor:
        """The gate g of ``coefficient_target`` (N, K): E_q[g] or the router's sg(E[g | s])."""
        return dirichlet_mean(beta_router).detach() if self.cfg.gate.coefficient_gate == "router" else E_g

    # Where a normalized measured configuration may lie for the anchor and the hold of the dropped experts:
    # the action normalizer maps the data's range to [-1, 1]; a measured joint outside it is held at this
    # bound, so that it cannot saturate the experts' input, nor, on a dimension the demonstrations hardly
    # moved (a range of 1e-4 rad scales a 1e-3 rad sag to 20), leak through the projections of the hold
    # onto the other joints.
    HOLD_BOUND = 1.5
    # An arm joint whose demonstrated actions span less than this (rad; offsets in the relative frame) is
    # not held at its measured value by model.selection.inactive = "hold" (see ``inactive_hold``).
    HOLD_MIN_RANGE = 0.01

    def expert_anchor(self, qpos: torch.Tensor, Bm: torch.Tensor, g_bar: torch.Tensor) -> torch.Tensor | None:
        """model.expert.anchor: each expert's own coordinate of the measured configuration, an input that
        lets it start its chunk where the arms are (docs/POLICY.md, "Expert anchor"); None when off.

        qpos (N, T_o, D) raw, Bm = B(s) (N, D, K), g_bar = E[g | s] from the router (N, K) -> (N, K):
        c_i = b_i(s)^T q~_t / (g_bar_i + eps) / z_scale, with q~_t the newest configuration as the model's
        chunk would hold it (normalized like the actions, in the model's action frame, bounded by
        HOLD_BOUND): the same projection and division as the target z_i = b_i^T a / (g_i + eps) of
        eq. 34, so an expert whose chunk holds still is asked for x_0 = c_i. Divided by the router's gate,
        not the posterior's (which reads the demonstrated chunk and is unknown at inference), and with
        no gradient (an input, like sg(B) in the target)."""
        if not self.cfg.expert.anchor:
            return None
        with torch.no_grad():
            hold = self.measured_configuration(qpos)  # (N, D)
            c = (hold.unsqueeze(1) @ Bm.float()).squeeze(1) / (g_bar.float() + self.cfg.z_eps)
            return c / self._diffusion_scale()

    def measured_configuration(self, qpos: torch.Tensor) -> torch.Tensor:
        """qpos (N, T_o, D) raw -> (N, D): the newest measured configuration as the model's chunk would hold
        it (normalized like the actions, in the model's action frame), bounded by HOLD_BOUND. What the
        expert anchor projects and what the dropped experts hold."""
        q = qpos[..., -1:, :].float()
        return self.chunk_target(q, qpos)[..., 0, :].clamp(-self.HOLD_BOUND, self.HOLD_BOUND)

    def _diffusion_scale(self) -> torch.Tensor:
        """z_scale, or 1 for an untrained policy (scale not fitted). Pure tensor ops: no host read."""
        return torch.where(self.z_scale > 0, self.z_scale, torch.ones_like(self.z_scale))

    # ---- inference (Algorithm 2) ------------------------------------------------------------------

    def stages(self) -> Stages:
        return Stages(self.encode, self.route, self.skill_basis, self.denoise_experts)

    def algorithm2(self, obs: Mapping[str, torch.Tensor], stages: Stages, clock: StageClock,
                   generator: torch.Generator | None = None, active: Any = None) -> PolicyOutput:
        """Algorithm 2, the one implementation: ``predict_action`` runs it with the policy's own stages,
        the inference engine with its backend's. Tensors in, tensors out (timings are the caller's:
        ``clock``). The selected experts' indices are read once, right after selection (their number
        |S| is the shape of everything after it): the call's one host sync before the result."""
        with clock.stage("encoder"):
            s = stages.encode(obs)  # (B, d_s)
        with clock.stage("router_select"):
            g_bar = stages.route(s)  # (B, K), g_bar = E[g | s]
            mask, coverage = self.select(g_bar, active)  # (B, K), (B,)  Section 4.2
            experts = mask.any(0).nonzero().flatten()  # (E,): the union of the batch's S; B = 1 runs |S|
        with clock.stage("basis"):
            Bm = stages.basis(s)  # (B, D, K)  eq. 12-16
        with clock.stage("denoise"):
            x = self.initial_noise(s.shape[0], generator)[:, experts]  # (B, E, 1, H)
            anchor = self.expert_anchor(obs[keys.QPOS], Bm, g_bar)
            anchor = None if anchor is None else anchor[:, experts]  # (B, E)
            x = stages.denoise(x, s, experts, anchor)  # DDIM over z_S only (eq. 36)
        with clock.stage("decode"):
            z = self.scatter_coefficients(x, mask, experts)  # (B, H, K)
            held = self.inactive_hold(obs[keys.QPOS], Bm, g_bar, z, mask)
            action = self.absolute_chunk(self.decode(Bm, g_bar, z, held), obs[keys.QPOS])  # a = B (g_bar ⊙ z) (eq. 1)
        return PolicyOutput(action, g_bar, mask, coverage, experts=experts)

    def route(self, s: torch.Tensor) -> torch.Tensor:
        """Stage 2a: g_bar = E[g | s] from the state-only router, (B, d_s) -> (B, K)."""
        return dirichlet_mean(self.gates.router(s))

    def select(self, g_bar: torch.Tensor, active: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2b: active set (B, K) bool and its mass coverage (B,). ``active`` forces the set: a (B, K)
        or (K,) bool mask, or a sequence of expert indices applied to every sample."""
        if active is None:
            return select_experts(g_bar, self.selection)
        mask = _as_mask(active, g_bar.shape, g_bar.device)
        m = g_bar * g_bar if self.selection.mass == "quadratic" else g_bar
        return mask, (m * mask).sum(-1) / m.sum(-1)

    def skill_basis(self, s: torch.Tensor) -> torch.Tensor:
        """Stage 3: B(s) (B, D, K)."""
        return self.basis(s)

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x^(T) = z^(T) / z_scale for all K experts (B, K, 1, H). Drawn for every expert so that an expert's
        sample does not depend on which other experts are active."""
        return torch.randn((batch_size, self.cfg.num_experts, 1, self.cfg.horizon), generator=generator,
                           device=self.device)

    def denoise_experts(self, x: torch.Tensor, s: torch.Tensor, experts: torch.Tensor,
                        anchor: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM over the chosen experts only: x (B, E, 1, H) noise, experts (E,) -> x_0 (B, E, 1, H), the
        diffusion variable (z = z_scale * x_0, see ``coefficients``); ``anchor`` (B, E) the chosen experts'
        columns of ``expert_anchor`` when model.expert.anchor is on.
        Pure tensor ops over the precomputed schedule (capturable). The experts' weights are gathered
        once, before the loop: the set is the same at every step."""
        Bn = x.shape[0]
        weights = self.experts.gather(experts)
        for i in range(self.scheduler.num_inference_steps):
            eps = self.experts.run(x, self.scheduler.timesteps[i].expand(Bn), s, weights, anchor)
            x = self.scheduler.step(i, x, eps)
        return x

    def scatter_coefficients(self, x: torch.Tensor, active: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The experts' samples x_0 (B, E, 1, H) -> z (B, H, K): z_S = z_scale * x_0 for each sample's own
        active set (``active`` (B, K)), every other coefficient 0."""
        coeff = self.coefficients(x[:, :, 0])  # (B, E, H)
        z = coeff.new_zeros(x.shape[0], self.cfg.num_experts, self.cfg.horizon)  # coeff's dtype: under bf16
        z[:, experts] = coeff  # autocast s is bf16, the samples are not
        return (z * active.unsqueeze(-1)).transpose(1, 2)  # (B, H, K)

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """The experts' denoised diffusion variable -> the skill coefficients z = z_scale * x (any shape).
        An untrained policy (scale not fitted) uses 1. Pure tensor ops: no host read, capturable."""
        return x * self._diffusion_scale()

    def decode(self, Bm: torch.Tensor, g_bar: torch.Tensor, z: torch.Tensor,
               held: torch.Tensor | None = None) -> torch.Tensor:
        """Stage 5: a = B (g_bar ⊙ z_h) for every h, un-normalized, in the model's action frame:
        (B, D, K), (B, K), (B, H, K) -> (B, H, D). ``held`` (B, H, K), from ``inactive_hold``, is added to
        the gated coefficients (it is 0 on the active experts, whose z it does not touch)."""
        w = g_bar.unsqueeze(1) * z  # (B, H, K)
        if held is not None:
            w = w + held.to(w.dtype)
        return self.normalizer.unnormalize("action", w @ Bm.transpose(-1, -2))  # (B, H, D)

    def inactive_hold(self, qpos: torch.Tensor, Bm: torch.Tensor, g_bar: torch.Tensor, z: torch.Tensor,
                      active: torch.Tensor) -> torch.Tensor | None:
        """model.selection.inactive = "hold" (docs/POLICY.md, "Inactive experts"): the gated coefficients
        the experts outside the active set contribute instead of 0; None for "zero" (Algorithm 2 as
        written). qpos (B, T_o, D) raw, Bm = B(s) (B, D, K), g_bar (B, K), z (B, H, K) zero off the active
        set, active (B, K) bool -> (B, H, K): b_i(s)^T r_h off the active set and 0 on it.

        r_h is the configuration to hold, in the model's normalized frame: on the arm joints the
        demonstrations move (an action range of at least HOLD_MIN_RANGE) the newest measured q_t (bounded
        by HOLD_BOUND); elsewhere the active experts' own chunk u_h = B (g_bar ⊙ z_h), because a gripper's
        measured width is not its command (it stops on the object it closes on) and a joint the
        demonstrations never moved is scaled by a tiny range, and a measured value there would reach the
        other joints through the projections. The decoded chunk then keeps the active experts' component
        along their own directions and, along every dropped direction, r's: no motion along b_i, which is
        what a zero coefficient means when the actions are motions (the paper's end-effector primitives),
        and not, as here by default, absolute joint targets, where it moves the arms towards the
        normalizer's centre."""
        if self.selection.inactive != "hold":
            return None
        span = self.normalizer.action_max - self.normalizer.action_min  # (D,) raw units of the model's frame
        held = torch.zeros_like(span, dtype=torch.bool)
        held[list(ARM_JOINT_INDICES)] = True
        held &= span >= self.HOLD_MIN_RANGE
        own = (g_bar.unsqueeze(1) * z).float() @ Bm.float().transpose(-1, -2)  # (B, H, D): u_h
        r = torch.where(held, self.measured_configuration(qpos).unsqueeze(1), own)
        return (r @ Bm.float()) * (~active).unsqueeze(1)

    @torch.no_grad()
    def fit_z_scale(self, batch: Mapping[str, torch.Tensor]) -> float:
        """Fix ``z_scale`` to the RMS of z_sg (eq. 34) over a training batch (B, L, ...) under the current
        weights, with the encoder in eval mode (no random crop, no RNG draws); returns it. Call once, before
        training and before copying the model (EMA), after set_normalizer."""
        self._check(batch, segment=True)
        self._require_normalizer()
        was_training = self.training
        self.eval()
        try:
            obs, _, _ = self._flatten_segments(batch)
            s = self.encode(obs)
            a = self.chunk_target(batch[keys.ACTION], batch[keys.QPOS]).flatten(0, 1)
            E_g = dirichlet_mean(self.gates.posterior(s, a))
            self._set_z_scale(self.coefficient_target(a, self.basis(s), E_g, self.gates.router(s)))
        finally:
            self.train(was_training)
        return float(self.z_scale)

    @torch.no_grad()
    def _set_z_scale(self, z: torch.Tensor) -> None:
        rms = z.detach().float().pow(2).mean().sqrt()
        if not bool(torch.isfinite(rms)) or float(rms) <= 0:
            raise ValueError(f"fit_z_scale: the coefficients' RMS is {float(rms)}; the batch's actions are "
                             "constant at the normalizer's centre or not finite")
        self.z_scale.copy_(rms)
        self._z_scale_fitted = True

    @torch.no_grad()
    def fit_pca_basis(self, actions: torch.Tensor) -> None:
        """For model.basis.kind = "pca": fix B to the top-K principal directions of the dataset's actions
        (raw units in the model's action frame, (..., D): ``data.dataset.frame_actions``); call after
        set_normalizer, since the basis lives in normalized space."""
        self._require_normalizer()
        self.basis.fit_pca(self.normalizer.normalize("action", torch.as_tensor(actions, dtype=torch.float32)
                                                     .to(self.device)).reshape(-1, self.cfg.action_dim))


class DensePolicy(_PolicyBase):
    """Diffusion Policy baseline: one conditional 1-D UNet over the full D-dim action chunk, same encoder
    and interface (model.policy = "dense_dp"). gate/active/coverage are reported for a single 'expert'."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.policy != "dense_dp":
            raise ValueError(f"model.policy: DensePolicy needs 'dense_dp', got {cfg.policy!r} (use build_policy)")
        super().__init__(cfg)
        e = cfg.expert
        self.unet = StackedUnet1D(1, cfg.action_dim, cfg.encoder.state_dim, cfg.dense_down_dims, e.kernel_size,
                                  e.n_groups, e.step_embed_dim)

    def compute_loss(self, batch: Mapping[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        self._check(batch, segment=True)
        self._require_normalizer()
        obs, Bn, L = self._flatten_segments(batch)
        s = self.encode(obs)
        a = self.chunk_target(batch[keys.ACTION], batch[keys.QPOS]).flatten(0, 1)  # (N, H, D)
        x0 = a.transpose(1, 2).unsqueeze(1)  # (N, 1, D, H)
        noise = torch.randn_like(x0)
        tau = self.scheduler.sample_timesteps((x0.shape[0],), x0.device)
        pred = self.unet(self.scheduler.add_noise(x0, noise, tau), tau, s, self.unet.all_experts(s.device))
        coeff = (pred - self.scheduler.training_target(x0, noise)).pow(2).sum((1, 2, 3)).reshape(Bn, L).sum(1).mean()
        zero = coeff.new_zeros(())
        return {"loss": coeff, "coeff": coeff, "recon": zero, "gate": zero, "align": zero}

    def stages(self) -> Stages:
        return Stages(self.encode, None, None, self.denoise_experts)

    def algorithm2(self, obs: Mapping[str, torch.Tensor], stages: Stages, clock: StageClock,
                   generator: torch.Generator | None = None, active: Any = None) -> PolicyOutput:
        """The dense baseline's sampling, in SMP's stage structure (no router, no basis: one 'expert')."""
        with clock.stage("encoder"):
            s = stages.encode(obs)  # (B, d_s)
        Bn = s.shape[0]
        experts = torch.zeros(1, dtype=torch.long, device=s.device)  # the one network
        with clock.stage("denoise"):
            x = torch.randn((Bn, 1, self.cfg.action_dim, self.cfg.horizon), generator=generator,
                            device=self.device)  # (B, 1, D, H)
            x = stages.denoise(x, s, experts, None)
        with clock.stage("decode"):
            action = self.absolute_chunk(self.normalizer.unnormalize("action", x[:, 0].transpose(1, 2)),
                                         obs[keys.QPOS])  # (B, H, D)
        ones = s.new_ones(Bn, 1)
        return PolicyOutput(action, ones, ones.bool(), ones[:, 0], experts=experts)

    def denoise_experts(self, x: torch.Tensor, s: torch.Tensor, experts: torch.Tensor,
                        anchor: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM over the dense UNet: x (B, 1, D, H) noise -> x_0; ``experts`` is always the one network
        (``anchor`` is SMP's; the dense policy reads q_t in its state only)."""
        weights = self.unet.gather(self.unet.all_experts(s.device))  # the inference form, as SMP's experts
        for i in range(self.scheduler.num_inference_steps):
            x = self.scheduler.step(i, x, self.unet.run(x, self.scheduler.timesteps[i].expand(x.shape[0]), s,
                                                        weights))
        return x


def _mirror_z_scale(module: nn.Module, incompatible_keys: Any) -> None:
    module._z_scale_fitted = bool(module.z_scale > 0)


def build_policy(cfg: ModelConfig) -> SMPPolicy | DensePolicy:
    """The policy class model.policy names."""
    return SMPPolicy(cfg) if cfg.policy == "smp" else DensePolicy(cfg)


def _as_mask(active: Any, shape: torch.Size, device: torch.device) -> torch.Tensor:
    Bn, K = shape
    t = torch.as_tensor(active, device=device)
    if t.dtype == torch.bool:
        if t.shape not in ((K,), (Bn, K)):
            raise ValueError(f"active: a bool mask must have shape ({K},) or ({Bn}, {K}), got {tuple(t.shape)}")
        mask = t.expand(Bn, K).clone()
    else:
        idx = t.long().flatten()
        if idx.numel() and (idx.min() < 0 or idx.max() >= K):
            raise ValueError(f"active: expert indices must be in 0..{K - 1}, got {idx.tolist()}")
        mask = torch.zeros(Bn, K, dtype=torch.bool, device=device)
        mask[:, idx] = True
    if not bool(mask.any(-1).all()):
        raise ValueError("active: every sample needs at least one active expert")
    return mask
