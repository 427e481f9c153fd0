"""Training loop for SMP (and the dense baseline): single process or data-parallel under torchrun.

Optimisation follows B.3 (AdamW; defaults in ``TrainConfig``) with linear warmup then cosine decay,
gradient clipping, an exponential moving average of the weights (what is saved for inference) and
bf16 autocast on CUDA and on CPUs with bf16 instructions (``step_autocast``). Batches are trajectory
segments (``data.dataset``); the batch of step n is a pure function of (seed, n), so a resumed run or
a run split over W processes sees the same samples.

Output layout for ``out = models/foo``::

    models/foo/            the model directory (inference needs only this): model.safetensors,
                           config.yaml, normalizer.json, manifest.json, training_summary.json
    models/foo.train/      training state: state.pt (model, EMA, optimizer, LR schedule, RNG states,
                           step; loaded with torch.load(weights_only=True)), history.jsonl (logged
                           losses), val.jsonl (validation losses and gate health per checkpoint), tb/ (TensorBoard), diagnostics/ (gate traces, flip-rate,
                           segment lengths; PNG + JSON)

Running the same command again resumes from ``state.pt`` (e.g. after the process was killed), if the
data is the same: the resume check includes the dataset fingerprint (bag paths, sizes, modification
times and the ingest config). New or changed bags under ``--data`` with the same ``--out`` start a new
run, announced, with the old training state moved aside (``on_data_change = "restart"``), or fine-tune
the model already in ``--out`` on the new data (``"finetune"``). A finished run on unchanged data is
reported as such and left alone. A non-finite loss stops training with an error before anything with
non-finite weights is checkpointed or saved.
Data parallel: ``torchrun --nproc-per-node N -m smp_ros.cli train ...`` (NCCL on CUDA, gloo on the
CPU); several machines: the same command on each with ``--nnodes M --node-rank R
--rdzv-backend c10d --rdzv-endpoint HOST:PORT`` and the data and ``--out`` on a shared file system.
``train.batch_size`` is the global batch, split evenly over the processes; rank 0 ingests, logs,
checkpoints and writes the model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from smp_ros.config import SMPConfig
from smp_ros.data.cache import DatasetCache, prepare_cache
from smp_ros.data.dataset import (SegmentDataset, StepBatches, frame_actions, normalizer_stats, split_episodes,
                                  to_tensors)
from smp_ros.model.checkpoint import CheckpointError, load_model, nonfinite_tensors, save_model
from smp_ros.model.policy import SMPPolicy, build_policy

LOSS_TERMS = ("loss", "coeff", "recon", "gate", "align")
STATE_FILE = "state.pt"
HISTORY_FILE = "history.jsonl"  # one JSON line per log step: loss terms, lr, grad norm
# One JSON line per checkpoint: validation loss terms and, for SMP, the router's gate health on the
# held-out episodes (gate entropy, mean |S| at tau_m, flip-rate, phase NMI; train/diagnostics.py).
VAL_FILE = "val.jsonl"
SUMMARY_FILE = "training_summary.json"
VAL_BATCHES = 4
Z_SCALE_SEGMENTS = 256  # training segments the experts' diffusion scale is fitted on (policy.fit_z_scale)


class TrainError(RuntimeError):
    """Training cannot start or continue as asked; the message says what to change."""


@dataclass
class TrainRequest:
    """Everything a training run needs besides the config tree."""

    data: list[str]  # bag directories, folders of bags, or one dataset cache directory
    out: Path
    init: Path | None = None  # a model directory to start from
    finetune: str | None = None  # None | "full" | "router"
    device: str = "auto"
    task: str | None = None  # task name of bags that name none (a bag naming another task is an error)
    override_task: bool = False  # with task: relabel every bag as task, even ones naming their own
    on_data_change: str = "restart"  # "restart" | "finetune": what a changed dataset does to an existing state
    fail_on_skip: bool = False  # stop (after listing them) when data.on_bad_episode = skip skipped any bag
    cache_dir: Path | None = None
    ingest_workers: int | None = None  # processes decoding bags (default: up to 2)
    progress: bool = True
    diagnostics: bool = True
    stop_after: int | None = None  # stop (with a checkpoint) once this step is reached; for tests
    on_log: Callable[[int, dict[str, float]], None] | None = None


def state_dir(out: Path) -> Path:
    return out.with_name(out.name + ".train")


def trainable_parameters(policy: nn.Module, finetune: str | None) -> list[str]:
    """Names of the parameters that train. Router fine-tuning (Table 4) trains only the gates:
    the amortizer q(g|s,a), the router p(g|s) and global usage; encoder, basis and experts stay frozen."""
    names = [n for n, _ in policy.named_parameters()]
    if finetune == "router":
        if not isinstance(policy, SMPPolicy):
            raise TrainError("--finetune router needs an SMP model (model.policy = 'smp'); the dense baseline "
                             "has no router")
        return [n for n in names if n.startswith("gates.")]
    return names


# Train settings that decide how a step runs, not what it computes: left out of a run's identity, so a
# run resumes across them (and across versions that predate them).
EXECUTION_FIELDS = ("cpu_bf16", "distinct_frames", "channels_last", "fused_optimizer", "model_size_frames")


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX); without them bf16 autocast is emulated
    and slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def step_autocast(device: torch.device, tcfg) -> contextlib.AbstractContextManager:
    """The autocast a training step runs under: bf16 on CUDA (train.mixed_precision) and on CPUs with bf16
    instructions (train.cpu_bf16), float32 otherwise. Parameters, gradients and AdamW stay float32."""
    if device.type == "cuda" and tcfg.mixed_precision:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and tcfg.cpu_bf16 and cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_for_training(policy: nn.Module, tcfg) -> None:
    """Apply the execution settings of ``train`` to a policy (before the EMA copy, which inherits them)."""
    policy.distinct_frames = tcfg.distinct_frames
    policy.encoder.channels_last = tcfg.channels_last


def make_optimizer(params: list[torch.Tensor], tcfg, device: torch.device) -> torch.optim.AdamW:
    # fused: one kernel over all parameters per step instead of ~10 small ops per tensor (B.3's AdamW either way).
    fused = True if tcfg.fused_optimizer and device.type in ("cpu", "cuda") else None
    return torch.optim.AdamW(params, lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay, fused=fused)


def run_identity_config(cfg: SMPConfig) -> dict:
    plain = cfg.to_dict()
    for name in EXECUTION_FIELDS:
        plain["train"].pop(name, None)
    return plain


def cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


class EMA:
    """Exponential moving average of the trainable weights; decay warms up as min(d, (1+n)/(10+n))."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        ema = dict(self.model.named_parameters())
        src = [(ema[n], p) for n, p in model.named_parameters() if p.requires_grad]
        torch._foreach_lerp_([e for e, _ in src], [p.detach() for _, p in src], 1.0 - d)
        # Buffers (the normalizer, the policy's z_scale) are not averaged: the copy follows the model's.
        mine = dict(self.model.named_buffers())
        for name, b in model.named_buffers():
            mine[name].copy_(b)


class _LossModule(nn.Module):
    """DDP synchronises gradients of what runs inside forward(); the policy's loss is a method."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        return self.policy.compute_loss(batch, step)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device cuda: no CUDA device is available")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise TrainError(f"--device: expected cpu, cuda or auto, got {name!r}")
    return torch.device("cpu")


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def data_config_for(cfg: SMPConfig):
    """Ingest only the cameras the model reads (none for a low-dimensional model)."""
    enc = cfg.model.encoder
    cams = {c: cfg.data.topics.cameras[c] for c in enc.cameras} if enc.mode == "vision" else {}
    missing = [c for c in enc.cameras if enc.mode == "vision" and c not in cfg.data.topics.cameras]
    if missing:
        raise TrainError(f"model.encoder.cameras {missing} have no topic in data.topics.cameras")
    return dataclasses.replace(cfg.data, topics=dataclasses.replace(cfg.data.topics, cameras=cams),
                               object_slots=enc.object_slots)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class TrainResult:
    out: Path
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    already_done: bool = False  # a finished run on unchanged data: nothing was trained or written


def _say(req: TrainRequest, ddp: "_Dist", text: str) -> None:
    if ddp.main and req.progress:
        print(text, flush=True)


def train(cfg: SMPConfig, req: TrainRequest) -> TrainResult:
    """Train (or resume, or fine-tune) and write the model directory; see the module docstring."""
    if req.on_data_change not in ("restart", "finetune"):
        raise TrainError(f"on_data_change: expected restart or finetune, got {req.on_data_change!r}")
    if req.override_task and req.task is None:
        raise TrainError("--override-task needs --task NAME (the task to label every bag with)")
    if req.finetune is not None and req.init is None:
        raise TrainError(f"--finetune {req.finetune} needs --init MODEL_DIR (the model to adapt)")
    if req.finetune not in (None, "full", "router"):
        raise TrainError(f"--finetune: expected full or router, got {req.finetune!r}")
    tcfg = cfg.train
    probe = _device(req.device, int(os.environ.get("LOCAL_RANK", "0")))
    ddp = _init_distributed(probe)
    device = _device(req.device, ddp.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    init_policy = None
    if req.init is not None:
        init_policy, init_cfg = load_model(req.init)
        cfg = dataclasses.replace(cfg, model=init_cfg.model)  # the network's shape comes from the checkpoint

    out = Path(req.out)
    sdir = state_dir(out)
    # Rank 0 ingests; the others wait and then open the finished cache.
    data_cfg = data_config_for(cfg)
    cache: DatasetCache | None = None
    if ddp.main:
        cache = prepare_cache(req.data, data_cfg, cache_dir=req.cache_dir, task=req.task,
                              workers=req.ingest_workers, progress=req.progress, override_task=req.override_task)
        _say(req, ddp, cache.summary_text())
        if req.fail_on_skip and cache.skipped:
            raise TrainError(f"{len(cache.skipped)} bag(s) were skipped (listed above; first: "
                             f"{cache.skipped[0]['reason']}); --fail-on-skip stops here. Fix or remove them")
    if ddp.world > 1:
        root = [str(cache.root) if cache else None]
        dist.broadcast_object_list(root, src=0)
        if not ddp.main:
            cache = DatasetCache.open(root[0])
    assert cache is not None
    for key, part in cache.stats.items():
        if isinstance(part, dict) and not all(math.isfinite(v) for vals in part.values() for v in vals):
            raise TrainError(f"{cache.root}: normalizer statistics {key} are not finite; the cache predates value "
                             "validation or is damaged: delete it to re-ingest the bags")
    out_state = sdir / STATE_FILE
    data_changed = None
    if out_state.is_file():
        saved_identity = json.loads(torch.load(out_state, map_location="cpu", weights_only=True,
                                               mmap=True)["identity"])
        if saved_identity.get("data") != cache.fingerprint:
            data_changed = saved_identity
        elif (req.init is None and req.on_data_change == "finetune" and saved_identity.get("init")
              and Path(saved_identity["init"]).parent.name.startswith(sdir.name + ".before-")):
            # Resuming an interrupted fine-tune that an earlier data change started.
            req = dataclasses.replace(req, init=Path(saved_identity["init"]), finetune=saved_identity["finetune"])
            init_policy, init_cfg = load_model(req.init)
            cfg = dataclasses.replace(cfg, model=init_cfg.model)
    if data_changed is not None:
        old = data_changed.get("data_summary") or {}
        archive = sdir.with_name(f"{sdir.name}.before-{(data_changed.get('data') or 'unknown')[:8]}")
        finetune_from = None
        if req.on_data_change == "finetune":
            if req.init is not None:
                raise TrainError("--on-data-change finetune fine-tunes the model in --out; do not also give --init")
            finetune_from = out
        _say(req, ddp, f"NEW DATA: the dataset differs from the one the training state in {sdir} was made with "
             f"({old.get('episodes', '?')} -> {len(cache.episodes)} episodes, {old.get('seconds', '?')} -> "
             f"{cache.summary()['seconds']} s). " + (
                 f"Fine-tuning the model in {out} on it (--on-data-change finetune)." if finetune_from else
                 "Starting a new run from scratch (--on-data-change finetune would adapt the existing model "
                 "instead).") + f" The old training state moves to {archive}.")
        if ddp.world > 1:
            dist.barrier()  # every rank has read the old identity before rank 0 moves it
        if ddp.main:
            shutil.rmtree(archive, ignore_errors=True)
            os.replace(sdir, archive)
        if ddp.world > 1:
            dist.barrier()
        if finetune_from is not None:
            try:
                init_policy, init_cfg = load_model(finetune_from)
            except CheckpointError as exc:
                raise TrainError(f"--on-data-change finetune: no usable model in {out} to fine-tune ({exc})") from None
            cfg = dataclasses.replace(cfg, model=init_cfg.model)
            req = dataclasses.replace(req, init=archive / "model", finetune=req.finetune or "full")
            if ddp.main:
                shutil.copytree(out, archive / "model")  # the starting point, kept with the state it came from
    train_eps, val_eps = split_episodes(cache, tcfg.val_fraction, tcfg.seed)
    m = cfg.model
    cams = m.encoder.cameras if m.encoder.mode == "vision" else ()
    for e in range(len(cache.episodes)):
        if cache.episodes[e].task_id >= m.encoder.num_tasks:
            raise TrainError(f"{cache.episodes[e].bag}: task {cache.episodes[e].task!r} has id "
                             f"{cache.episodes[e].task_id} but the model has model.encoder.num_tasks = "
                             f"{m.encoder.num_tasks}")
    size = m.encoder.image_size if tcfg.model_size_frames and cams else None
    objs = m.encoder.object_slots > 0
    regions = m.encoder.camera_regions
    train_set = SegmentDataset(cache, train_eps, m.obs_steps, m.horizon, tcfg.segment_length, cams, size,
                               objects=objs, regions=regions)
    val_set = SegmentDataset(cache, val_eps, m.obs_steps, m.horizon, tcfg.segment_length, cams, size,
                             objects=objs, regions=regions)
    if len(train_set) == 0:
        raise TrainError(f"{cache.root}: no training segments; every training episode is shorter than "
                         f"train.segment_length = {tcfg.segment_length} steps")

    torch.manual_seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    policy = build_policy(m)
    if init_policy is not None:
        policy.load_state_dict(init_policy.state_dict())
        # The normalizer stays the initial model's: experts and basis live in its normalised space.
        policy.set_normalizer(init_policy.normalizer.stats())
    else:
        policy.set_normalizer(normalizer_stats(cache, m))
        if isinstance(policy, SMPPolicy) and m.basis.kind == "pca":
            actions = frame_actions(cache, m.horizon, m.offset_dims) if m.offset_dims else cache.action
            policy.fit_pca_basis(torch.from_numpy(np.array(actions)))
    policy.to(device).train()
    configure_for_training(policy, tcfg)
    if isinstance(policy, SMPPolicy) and init_policy is None:
        # The experts diffuse z / z_scale (policy.py): fix the scale from the data under the initial weights,
        # on the same segments in every process, before the EMA copy is taken.
        ids = np.random.default_rng([tcfg.seed, 13]).permutation(len(train_set))[:Z_SCALE_SEGMENTS]
        policy.fit_z_scale(_to(to_tensors(train_set.batch(ids)), device))
    train_names = set(trainable_parameters(policy, req.finetune))
    for n, p in policy.named_parameters():
        p.requires_grad_(n in train_names)
    params = [p for n, p in policy.named_parameters() if n in train_names]
    optimizer = make_optimizer(params, tcfg, device)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(tcfg.warmup_steps, tcfg.steps))
    ema = EMA(policy, tcfg.ema_decay)
    # Each process draws its own diffusion noise and timesteps.
    torch.manual_seed(tcfg.seed * 1000 + ddp.rank)

    identity = {"config": run_identity_config(cfg), "finetune": req.finetune,
                "init": str(req.init) if req.init else None,
                "world_size": ddp.world, "data": cache.fingerprint,
                "data_summary": {"episodes": len(cache.episodes), "seconds": cache.summary()["seconds"]}}
    start = 0
    state_path = sdir / STATE_FILE
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        saved = json.loads(state["identity"])
        for name in EXECUTION_FIELDS:  # states written before these settings existed carry them
            saved["config"]["train"].pop(name, None)
        if saved != identity:
            diff = sorted(k for k in identity if saved.get(k) != identity[k])
            raise TrainError(f"{state_path}: training state of a different run (differs in {diff}); use another "
                             f"--out or delete {sdir} to start over")
        if isinstance(policy, SMPPolicy) and "z_scale" not in state["model"]:
            raise TrainError(f"{state_path}: training state from before the experts' diffusion variable was "
                             f"scaled (no z_scale); it cannot be resumed. Delete {sdir} to start over")
        policy.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        _set_rng_state(state["rng"][ddp.rank], device)
        start = int(state["step"])
        if start >= tcfg.steps and (out / SUMMARY_FILE).is_file():
            _say(req, ddp, f"{out}: already trained to step {start} on this data (dataset fingerprint "
                 f"{cache.fingerprint[:12]}); nothing to do. New or changed bags start a new run; to train again on "
                 f"the same data, delete {sdir} or choose another --out")
            return TrainResult(out=out, steps=start, summary=json.loads((out / SUMMARY_FILE).read_text()),
                               already_done=True)
        _say(req, ddp, f"resuming from {state_path} at step {start}")

    module: nn.Module = _LossModule(policy)
    if ddp.world > 1:
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None,
            # Router fine-tuning leaves the frozen modules without gradients.
            find_unused_parameters=req.finetune == "router")

    batches = StepBatches(train_set, tcfg.batch_size, tcfg.seed, ddp.rank, ddp.world)
    end = tcfg.steps if req.stop_after is None else min(tcfg.steps, req.stop_after)
    # Its own generator: creating a loader iterator draws a seed, which must not shift the global RNG
    # that diffusion noise comes from (a resumed run creates its iterator at a different point).
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start, end),
                                         num_workers=tcfg.num_workers, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(tcfg.seed))
    autocast = step_autocast(device, tcfg)
    writer = None
    if ddp.main:
        sdir.mkdir(parents=True, exist_ok=True)
        _truncate_history(sdir / HISTORY_FILE, start)
        _truncate_history(sdir / VAL_FILE, start)
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(sdir / "tb"), purge_step=start)
    bar = None
    if ddp.main and req.progress:
        from tqdm import tqdm
        bar = tqdm(total=tcfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    history: list[dict[str, float]] = []
    # Summed on the device and read once per log step, so CUDA is not synchronised every step.
    running = torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=device)
    # Set on the device when a loss is NaN/inf and read at log and checkpoint steps, so CUDA is not
    # synchronised every step; nothing trained past a bad step is ever checkpointed or saved.
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    first_unchecked = start
    count = 0
    t_start = time.time()
    step = start
    for step, batch in enumerate(loader, start=start):
        batch = _to(batch, device)
        with autocast:
            terms = module(batch, step)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        optimizer.step()
        schedule.step()
        ema.update(policy, step)
        running += torch.stack([terms[k].detach().double() for k in LOSS_TERMS])
        nonfinite |= ~torch.isfinite(terms["loss"].detach())
        count += 1
        done = step + 1
        if done % tcfg.log_every == 0 or done % tcfg.checkpoint_every == 0 or done == end:
            if ddp.world > 1:
                dist.all_reduce(nonfinite_any := nonfinite.to(torch.int32), op=dist.ReduceOp.MAX)
                bad = bool(nonfinite_any.item())
            else:
                bad = bool(nonfinite.item())
            if bad:
                if writer is not None:
                    writer.close()
                raise TrainError(f"non-finite loss (NaN or inf) at a step in [{first_unchecked + 1}, {done}]; "
                                 f"training stopped. The last checkpoint in {sdir} (step {first_unchecked} or "
                                 "earlier) is kept and no model was written. Check the data (normalizer "
                                 "statistics in the cache's index.json) or lower train.lr")
            first_unchecked = done
        if done % tcfg.log_every == 0 or done == end:
            avg = running / count
            if ddp.world > 1:
                dist.all_reduce(avg)
                avg /= ddp.world
            logged = {k: float(v) for k, v in zip(LOSS_TERMS, avg.cpu())}
            logged.update(step=done, lr=schedule.get_last_lr()[0], grad_norm=float(grad_norm))
            history.append(logged)
            if ddp.main:
                with open(sdir / HISTORY_FILE, "a") as f:
                    f.write(json.dumps(logged) + "\n")
            if writer is not None:
                for k in LOSS_TERMS:
                    writer.add_scalar(f"train/{k}", logged[k], done)
                writer.add_scalar("train/lr", logged["lr"], done)
                writer.add_scalar("train/grad_norm", logged["grad_norm"], done)
            if bar is not None:
                bar.set_postfix({k: f"{logged[k]:.3g}" for k in LOSS_TERMS})
            if req.on_log is not None and ddp.main:
                req.on_log(done, logged)
            running.zero_()
            count = 0
        if bar is not None:
            bar.update(1)
        if done % tcfg.checkpoint_every == 0 or done == end:
            # A finite loss does not prove finite weights (the step after it may have overflowed them).
            broken = nonfinite_tensors(dict(policy.named_parameters())) + nonfinite_tensors(ema.model.state_dict())
            if broken:
                if writer is not None:
                    writer.close()
                raise TrainError(f"non-finite weights after step {done} ({', '.join(broken[:3])}); training "
                                 f"stopped. The last checkpoint in {sdir} is kept and no model was written. "
                                 "Lower train.lr or check the data")
            _checkpoint(state_path, done, identity, policy, ema, optimizer, schedule, device, ddp)
            if writer is not None and len(val_set):
                val = validate(ema.model, val_set, tcfg.batch_size, tcfg.seed, device, done)
                for k, v in val.items():
                    writer.add_scalar(f"val/{k}", v, done)
                gates = {}
                if isinstance(ema.model, SMPPolicy):
                    from smp_ros.train.diagnostics import gate_metrics
                    gates = gate_metrics(ema.model, cache, val_eps)
                    for k, v in gates.items():
                        writer.add_scalar(f"gates/{k}", v, done)
                with open(sdir / VAL_FILE, "a") as f:
                    f.write(json.dumps({"step": done, **val, "gates": gates}) + "\n")
    if bar is not None:
        bar.close()
    elapsed = time.time() - t_start

    result = TrainResult(out=out, steps=end, history=history)
    if end < tcfg.steps:  # stopped early on request: the state is saved, the model is not final
        if writer is not None:
            writer.close()
        return result
    if ddp.main:
        val = validate(ema.model, val_set, tcfg.batch_size, tcfg.seed, device, end) if len(val_set) else {}
        summary = {
            "steps": tcfg.steps, "resumed_from": start, "seconds_this_run": elapsed, "device": str(device),
            "world_size": ddp.world, "finetune": req.finetune, "init": str(req.init) if req.init else None,
            "preset": cfg.preset, "final_train": history[-1] if history else None, "val": val,
            "data": {"cache": str(cache.root), "episodes": len(cache.episodes), "train_episodes": len(train_eps),
                     "val_episodes": len(val_eps), "control_steps": cache.num_steps,
                     "seconds": cache.summary()["seconds"], "skipped": len(cache.skipped),
                     "skipped_bags": cache.skipped, "notes": cache.summary()["notes"],
                     "tasks": sorted({e.task for e in cache.episodes}), "fingerprint": cache.fingerprint},
            "trainable_parameters": sum(p.numel() for p in params),
            "state_dir": str(sdir),
        }
        ema.model.cpu()
        save_model(ema.model, cfg, out, extra={"training_summary": SUMMARY_FILE})
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        if req.diagnostics and isinstance(ema.model, SMPPolicy):
            from smp_ros.train.diagnostics import run_diagnostics
            episodes = val_eps or train_eps
            summary["diagnostics"] = run_diagnostics(ema.model, cache, episodes, sdir / "diagnostics")["summary"]
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        result.summary = summary
        if writer is not None:
            writer.close()
    if ddp.world > 1:
        dist.barrier()
    return result


def snapshot(req: TrainRequest, dest: Path) -> dict[str, Any]:
    """Write the EMA weights of the latest checkpoint in ``req.out``.train as a model directory at ``dest``.

    For a run in progress (or one stopped early): the model it would write if it ended now, to evaluate
    while it trains. The configuration is the run's own (from its state); the normalizer is the initial
    model's for a fine-tune, else the dataset cache's, which must still be the data the run trains on.
    """
    state_path = state_dir(Path(req.out)) / STATE_FILE
    if not state_path.is_file():
        raise TrainError(f"{state_path}: no training state to snapshot (train first, with the same --out)")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    saved = json.loads(state["identity"])
    cfg = SMPConfig.from_dict(saved["config"], where=f"{state_path}: config")
    if saved.get("init"):
        stats = load_model(saved["init"])[0].normalizer.stats()
    else:
        cache = prepare_cache(req.data, data_config_for(cfg), cache_dir=req.cache_dir, task=req.task,
                              workers=req.ingest_workers, progress=req.progress, override_task=req.override_task)
        if cache.fingerprint != saved.get("data"):
            raise TrainError(f"{cache.root}: not the data the run in {state_path} was trained on (the bags under "
                             "--data changed); its normalizer would not match the weights")
        stats = normalizer_stats(cache, cfg.model)
    policy = build_policy(cfg.model)
    policy.set_normalizer(stats)
    policy.load_state_dict(state["ema"])
    info = {"snapshot_of": str(state_path), "step": int(state["step"]), "steps": cfg.train.steps}
    save_model(policy, cfg, dest, extra=info)
    return info


def _checkpoint(path: Path, step: int, identity: dict, policy: nn.Module, ema: EMA, optimizer, schedule,
                device: torch.device, ddp: _Dist) -> None:
    rng = _rng_state(device)
    if ddp.world > 1:
        gathered: list[Any] = [None] * ddp.world
        dist.all_gather_object(gathered, {k: v.cpu() for k, v in rng.items()})
        rngs = gathered
    else:
        rngs = [rng]
    if ddp.main:
        _atomic_save({"step": step, "identity": json.dumps(identity), "model": policy.state_dict(),
                      "ema": ema.model.state_dict(), "optimizer": optimizer.state_dict(),
                      "schedule": schedule.state_dict(), "rng": rngs}, path)
    if ddp.world > 1:
        dist.barrier()


def _truncate_history(path: Path, step: int) -> None:
    """Drop log lines past ``step``: a killed run logged steps that the resumed run repeats."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


@torch.no_grad()
def validate(policy: nn.Module, data: SegmentDataset, batch_size: int, seed: int, device: torch.device,
             step: int) -> dict[str, float]:
    """Mean loss terms over a fixed set of validation segments, with fixed diffusion noise."""
    was_training = policy.training
    policy.eval()
    n = min(len(data), VAL_BATCHES * batch_size)
    ids = np.random.default_rng([seed, 7]).permutation(len(data))[:n]
    totals = {k: 0.0 for k in LOSS_TERMS}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        chunks = [ids[i:i + batch_size] for i in range(0, n, batch_size)]
        for chunk in chunks:
            terms = policy.compute_loss(_to(to_tensors(data.batch(chunk)), device), step)
            for k in LOSS_TERMS:
                totals[k] += float(terms[k]) * len(chunk)
    policy.train(was_training)
    return {k: v / n for k, v in totals.items()}


def load_config(preset_name: str, overlay: Path | None = None, steps: int | None = None) -> SMPConfig:
    """A preset with an optional YAML overlay (any subset of the config tree) and a step count."""
    import yaml

    from smp_ros.config import ConfigError, preset
    extra = {}
    if overlay is not None:
        try:
            extra = yaml.safe_load(Path(overlay).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{overlay}: cannot read YAML ({exc})") from None
        if not isinstance(extra, dict):
            raise ConfigError(f"{overlay}: expected a mapping at the top level")
    if steps is not None:
        extra = {**extra, "train.steps": steps}
    return preset(preset_name).with_overrides(extra, where=str(overlay) if overlay else f"preset {preset_name}")


