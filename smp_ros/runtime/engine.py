"""The inference engine: a model directory loaded once, run as Algorithm 2 with per-stage timing.

Algorithm 2 itself is written once, in the policy (``SMPPolicy.algorithm2``, which
``predict_action`` runs with the policy's own stages); the engine runs it with its backend's
stages (``model.policy.Stages``) and its own denoising loop (CUDA graphs). Stages of one call
(names as in ``InferenceResult.timings``):

    preprocess     numpy observation -> tensors on the device, validated     (engine)
    encoder        s = enc(qpos, images, task)                               (policy.encode)
    router_select  g_bar = E[g | s]; S = coverage / top-k selection          (Section 4.2, Alg. 2)
    basis          B(s) = signed thin QR of W(s)                              (eq. 12-16)
    denoise        DDIM over z_S only: |S| experts, one batched call per step (eq. 36)
    decode         a = B (g_bar ⊙ z), un-normalised, copied to the host       (eq. 1)

Host-device synchronisation. The active-set size |S| decides which static shape (compiled
variant, CUDA graph) runs, so the host must know it: Algorithm 2 reads the selected indices once
per call, right after selection (``mask.any(0).nonzero()``), and that is the only sync
before the final copy of the action chunk to the host (a forced active set, used by benchmarks,
adds the policy's validation of that set). The denoising loop itself indexes the
precomputed DDIM coefficients by Python ints and never reads a device value. On CUDA with the
``eager``/``compiled`` backends the whole loop is one CUDA graph per |S| replayed from static
input buffers (noise, s, expert indices) preallocated for every |S| at warmup, so the loop
allocates nothing; any active set of that size replays the same graph, since the expert indices
are an input of the graph, not a constant. On the CPU there are no graphs: the loop runs in Python
around the (compiled) expert network and PyTorch's CPU allocator serves its intermediates. On CUDA
the observation is uploaded from page-locked staging buffers (``_upload``), so the copies are
asynchronous and do not block the host either.

Noise. ``initial_noise`` draws z^(T) for all K experts from a generator seeded per call and the
engine gathers the active ones, exactly as ``SMPPolicy.predict_action`` does: with the same seed
every backend starts from the same noise, which is what the numerics tests compare.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from smp_ros.config import RuntimeConfig, SMPConfig
from smp_ros.model import batch as keys
from smp_ros.model.checkpoint import load_model
from smp_ros.model.policy import STAGES as ALGORITHM_STAGES
from smp_ros.model.policy import DensePolicy, SMPPolicy, StageClock, Stages
from smp_ros.runtime.backends import EagerBackend, create_backend
from smp_ros.runtime.backends.base import Backend

log = logging.getLogger("smp_ros.runtime")

STAGES = ("preprocess",) + ALGORITHM_STAGES


@dataclass
class InferenceResult:
    action: np.ndarray  # (H, D) float32, raw SI targets; action[0] is due at the observation's time
    active: tuple[int, ...]  # the active set S (expert indices, ascending)
    gate: np.ndarray  # (K,) router mean g_bar
    coverage: float  # mass share of S
    # Seconds per stage, "total" (their sum; on CUDA each stage is timed by events on the GPU) and
    # "wall" (the host's clock around the whole call, what a caller waits: on CUDA it also holds the
    # host's launch work between stages and the final copies of gate and indices).
    timings: dict[str, float] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device: 'cuda' requested but CUDA is not available; use 'cpu' or 'auto'")
    return torch.device(name)


def configure_cpu_threads(threads: int) -> int:
    """Intra-op threads = the cores this process may use (or ``threads``); one inter-op thread, because
    the pipeline is a chain of dependent stages and extra inter-op threads only compete for cores."""
    n = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel region of the process
        pass
    return n


class _GraphedLoop:
    """The denoising loop for one |S| captured in a CUDA graph, with its static buffers."""

    def __init__(self, run_loop: Any, *inputs: torch.Tensor | None) -> None:
        # Static buffers of the loop's inputs (x, s, experts, anchor or None), refilled before each replay.
        self.inputs = tuple(None if t is None else t.clone() for t in inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up kernels / autotuning outside the capture
            for _ in range(2):
                run_loop(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = run_loop(*self.inputs)

    def __call__(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        for buffer, t in zip(self.inputs, inputs):
            if (buffer is None) != (t is None):
                raise ValueError("captured denoising loop: an input was None at capture and is not now, or "
                                 "the other way round")
            if buffer is not None:
                buffer.copy_(t)
        self.graph.replay()
        return self.out


class InferenceEngine:
    """Load once, ``warmup()``, then ``infer(obs)`` per control step (batch of one observation)."""

    def __init__(self, model: str | Path | nn.Module, runtime: RuntimeConfig | None = None, *,
                 backend: str | None = None, device: str | None = None,
                 overrides: Mapping[str, Any] | None = None, max_active: int | None = None) -> None:
        """``model``: a model directory, or a policy object (benchmarks with random weights).
        ``max_active``: largest |S| to prepare (default: the selection budget k; K to sweep all)."""
        self.runtime = runtime or RuntimeConfig()
        self.device = resolve_device(device or self.runtime.device)
        if self.device.type == "cpu":
            configure_cpu_threads(self.runtime.threads)
        if isinstance(model, nn.Module):
            self.model_dir: Path | None = None
            self.policy = model.to(self.device).eval()
            self.smp_cfg = SMPConfig(model=self.policy.cfg)
        else:
            self.model_dir = Path(model)
            self.policy, self.smp_cfg = load_model(self.model_dir, overrides, map_location=self.device)
        self.cfg = self.policy.cfg
        self.is_smp = isinstance(self.policy, SMPPolicy)
        if not self.is_smp and not isinstance(self.policy, DensePolicy):
            raise TypeError(f"model: expected an SMPPolicy or DensePolicy, got {type(self.policy).__name__}")
        self.cameras: tuple[str, ...] = tuple(self.cfg.encoder.cameras) if self.cfg.encoder.mode == "vision" else ()
        k = self.cfg.selection.k if max_active is None else max_active
        self.sizes = tuple(range(1, min(k, self.cfg.num_experts) + 1)) if self.is_smp else (1,)
        self.backend: Backend = create_backend(backend or self.runtime.backend, self.device, self.model_dir,
                                               self.sizes)
        self.net = self.policy.experts if self.is_smp else self.policy.unet
        self.backend.prepare(self.policy, self.net)
        sched = self.policy.scheduler
        self._steps = sched.num_inference_steps
        self._tau = [sched.timesteps[i].reshape(1) for i in range(self._steps)]  # (1,) per step, on device
        self._graphs: dict[int, _GraphedLoop] = {}
        self._generator = torch.Generator(device=self.device)
        self._staging: dict[str, torch.Tensor] = {}  # pinned host buffers of the CUDA uploads, per key
        self._uploaded: Any = None  # CUDA event after the last uploads from those buffers

    @property
    def backend_name(self) -> str:
        return self.backend.name

    # ---- warmup -----------------------------------------------------------------------------------

    def warmup(self, iterations: int = 2) -> None:
        """Build every |S| variant (compile, capture) and run the pipeline, so no call pays for it later.

        A backend that fails to build falls back to eager here, with a log line saying why."""
        try:
            self._warmup(iterations)
        except Exception as exc:  # a compiler or runtime failure must not take the robot down
            if self.backend.name == EagerBackend.name:
                raise
            log.warning("inference backend %s failed at warmup (%s: %s); falling back to eager",
                        self.backend.name, type(exc).__name__, exc)
            self.backend = create_backend(EagerBackend.name, self.device, self.model_dir, self.sizes)
            self.backend.prepare(self.policy, self.net)
            self._graphs.clear()
            self._warmup(iterations)

    def _warmup(self, iterations: int) -> None:
        obs = self.example_observation()
        for n in self.sizes:
            for _ in range(iterations):
                self.infer(obs, seed=0, active=list(range(n)) if self.is_smp else None)
        for _ in range(iterations):
            self.infer(obs, seed=0)

    def example_observation(self) -> dict[str, np.ndarray]:
        """A valid observation of the model's shape (home-ish joint values, grey images of
        ``runtime.camera_size``, the frames the engine will receive, or of the model's image size)."""
        cfg = self.cfg
        obs: dict[str, np.ndarray] = {keys.QPOS: np.zeros((1, cfg.obs_steps, cfg.action_dim), np.float32),
                                      keys.TASK: np.zeros((1,), np.int64)}
        if cfg.encoder.object_slots:
            obs[keys.OBJECTS] = np.zeros((1, cfg.obs_steps, cfg.encoder.object_slots * 7), np.float32)
            obs[keys.OBJECTS][..., 6::7] = 1.0  # identity orientations
        if self.cameras:
            h, w = self.runtime.frame_size(cfg.encoder.image_size)
            obs[keys.IMAGES] = np.full((1, cfg.obs_steps, len(self.cameras), h, w, 3), 128, np.uint8)
        return obs

    # ---- inference --------------------------------------------------------------------------------

    @torch.inference_mode()
    def infer(self, obs: Mapping[str, Any], seed: int | None = None, active: Any = None) -> InferenceResult:
        """One observation (``qpos`` (1, T_o, D) or (T_o, D), ``task`` (1,) or int, ``images``
        (1, T_o, N_cam, H, W, 3) uint8 in vision mode; raw units) -> action chunk and diagnostics.
        ``active`` forces the active set (expert indices), as in ``predict_action``."""
        start = time.perf_counter()
        clock = StageClock(self.device)
        with clock.stage("preprocess"):
            tensors = self._to_tensors(obs)
            if seed is not None:
                self._generator.manual_seed(seed)
        stages = Stages(self.backend.encode, self.backend.route, self.backend.basis, self._denoise)
        out = self.policy.algorithm2(tensors, stages, clock, self._generator, active)
        with clock.stage("decode"):  # the chunk's copy to the host is part of decoding it
            action_np = out.action[0].float().cpu().numpy()  # (H, D)
        if self.is_smp:
            active_set = tuple(int(i) for i in out.experts.cpu())
            gate_np, cov = out.gate[0].float().cpu().numpy(), float(out.coverage[0])
        else:
            active_set, gate_np, cov = (0,), np.ones(1, np.float32), 1.0
        timings = clock.seconds()
        timings["total"] = sum(timings.values())
        timings["wall"] = time.perf_counter() - start
        return InferenceResult(action_np, active_set, gate_np, cov, timings)

    def _to_tensors(self, obs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        qpos = np.asarray(obs[keys.QPOS], dtype=np.float32)
        if qpos.ndim == 2:
            qpos = qpos[None]
        if qpos.shape != (1, cfg.obs_steps, cfg.action_dim):
            raise ValueError(f"obs[{keys.QPOS!r}]: expected (1, T_o={cfg.obs_steps}, D={cfg.action_dim}), "
                             f"got {qpos.shape}")
        if not np.all(np.isfinite(qpos)):
            raise ValueError(f"obs[{keys.QPOS!r}]: non-finite joint positions; refusing to infer from them")
        task = np.asarray(obs[keys.TASK], dtype=np.int64).reshape(-1)
        if task.shape != (1,) or not 0 <= task[0] < cfg.encoder.num_tasks:
            raise ValueError(f"obs[{keys.TASK!r}]: expected one task id in 0..{cfg.encoder.num_tasks - 1}, got {task}")
        host = {keys.QPOS: qpos, keys.TASK: task}
        if cfg.encoder.object_slots:
            n_obj = cfg.encoder.object_slots * 7
            if obs.get(keys.OBJECTS) is None:
                raise ValueError(f"obs[{keys.OBJECTS!r}]: this model reads tracked object poses "
                                 f"(1, T_o={cfg.obs_steps}, {n_obj}); none given")
            objects = np.asarray(obs[keys.OBJECTS], dtype=np.float32)
            if objects.ndim == 2:
                objects = objects[None]
            if objects.shape != (1, cfg.obs_steps, n_obj) or not np.all(np.isfinite(objects)):
                raise ValueError(f"obs[{keys.OBJECTS!r}]: expected finite (1, T_o={cfg.obs_steps}, {n_obj}) object "
                                 f"poses, got {objects.shape}")
            host[keys.OBJECTS] = objects
        if self.cameras:
            images = np.asarray(obs[keys.IMAGES])
            if images.ndim == 5:
                images = images[None]
            if images.dtype != np.uint8 or images.shape[:3] != (1, cfg.obs_steps, len(self.cameras)) \
                    or images.shape[-1] != 3:
                raise ValueError(f"obs[{keys.IMAGES!r}]: expected uint8 (1, T_o={cfg.obs_steps}, "
                                 f"N_cam={len(self.cameras)}, H, W, 3), got {images.dtype} {images.shape}")
            host[keys.IMAGES] = images
        # Uploads only once everything is validated, so a refused observation starts no copy.
        if self.device.type != "cuda":
            return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in host.items()}
        # The previous call's copies out of the staging buffers must be done before they are refilled. They
        # normally are (its action chunk's copy to the host waited for them): query, and only wait if not.
        if self._uploaded is not None and not self._uploaded.query():
            self._uploaded.synchronize()
        out = {k: self._upload(k, v) for k, v in host.items()}
        self._uploaded = torch.cuda.Event()
        self._uploaded.record()
        return out

    def _upload(self, key: str, array: np.ndarray) -> torch.Tensor:
        """Host array -> CUDA tensor through a page-locked staging buffer per key, allocated once per
        shape. A copy from pageable memory is staged by the driver and blocks the host; a copy from
        pinned memory is an asynchronous DMA that overlaps with the encoder's first kernels. The
        buffers are reused by the next call once ``_uploaded`` (an event after this call's copies) has
        passed; every call's final device-to-host copy has normally drained them already."""
        src = torch.from_numpy(np.ascontiguousarray(array))
        buf = self._staging.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = self._staging[key] = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        buf.copy_(src)
        return buf.to(self.device, non_blocking=True)

    def _loop(self, x: torch.Tensor, s: torch.Tensor, experts: torch.Tensor,
              anchor: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM over the precomputed schedule; pure tensor ops, no host reads (capturable). The active
        experts' weights are gathered once per call, inside the loop function, so a CUDA graph
        re-gathers from its static index buffer at every replay."""
        eps_net = self.backend.eps(experts.shape[0])
        weights = self.backend.gather(experts)
        step = self.policy.scheduler.step
        extra = () if anchor is None else (anchor,)  # model.expert.anchor: one more network input
        for i in range(self._steps):
            x = step(i, x, eps_net(x, self._tau[i], s, weights, *extra))
        return x

    def _denoise(self, x: torch.Tensor, s: torch.Tensor, experts: torch.Tensor,
                 anchor: torch.Tensor | None = None) -> torch.Tensor:
        if not (self.backend.cuda_graphs and self.device.type == "cuda"):
            return self._loop(x, s, experts, anchor)
        n = experts.shape[0]
        graph = self._graphs.get(n)
        if graph is None:
            graph = self._graphs[n] = _GraphedLoop(self._loop, x, s, experts, anchor)
        return graph(x, s, experts, anchor)
