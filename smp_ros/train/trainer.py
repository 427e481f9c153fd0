"""Training loop for SMP (and the dense baseline): single process or data-parallel under torchrun.

Optimisation follows B.3 (AdamW; defaults in ``TrainConfig``) with linear warmup then cosine decay,
gradient clipping, an exponential moving average of the weights (what is saved for inference) and
bf16 autocast on CUDA. Batches are trajectory segments (``data.dataset``); the batch of step n is a
pure function of (seed, n), so a resumed run or a run split over W processes sees the same samples.

Output layout for ``out = models/foo``::

    models/foo/            the model directory (inference needs only this): model.safetensors,
                           config.yaml, normalizer.json, manifest.json, training_summary.json
    models/foo.train/      training state: state.pt (model, EMA, optimizer, LR schedule, RNG states,
                           step; loaded with torch.load(weights_only=True)), history.jsonl (logged
                           losses), val.jsonl (validation losses and gate health per checkpoint), tb/ (TensorBoard), diagnostics/ (gate traces, flip-rate,
                           segment lengths; PNG + JSON)

Running the same command again resumes from ``state.pt`` (e.g. after the process was killed).
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
from smp_ros.data.dataset import SegmentDataset, StepBatches, split_episodes, to_tensors
from smp_ros.model.checkpoint import load_model, save_model
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
    task: str | None = None  # task name for every bag (overrides the bag's task topic)
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


def train(cfg: SMPConfig, req: TrainRequest) -> TrainResult:
    """Train (or resume, or fine-tune) and write the model directory; see the module docstring."""
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
                              workers=req.ingest_workers, progress=req.progress)
    if ddp.world > 1:
        root = [str(cache.root) if cache else None]
        dist.broadcast_object_list(root, src=0)
        if not ddp.main:
            cache = DatasetCache.open(root[0])
    assert cache is not None
    train_eps, val_eps = split_episodes(cache, tcfg.val_fraction, tcfg.seed)
    m = cfg.model
    cams = m.encoder.cameras if m.encoder.mode == "vision" else ()
    for e in range(len(cache.episodes)):
        if cache.episodes[e].task_id >= m.encoder.num_tasks:
            raise TrainError(f"{cache.episodes[e].bag}: task {cache.episodes[e].task!r} has id "
                             f"{cache.episodes[e].task_id} but the model has model.encoder.num_tasks = "
                             f"{m.encoder.num_tasks}")
    objs = m.encoder.object_slots > 0
    train_set = SegmentDataset(cache, train_eps, m.obs_steps, m.horizon, tcfg.segment_length, cams, objs)
    val_set = SegmentDataset(cache, val_eps, m.obs_steps, m.horizon, tcfg.segment_length, cams, objs)
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
        policy.set_normalizer(cache.stats)
        if isinstance(policy, SMPPolicy) and m.basis.kind == "pca":
            policy.fit_pca_basis(torch.from_numpy(np.asarray(cache.action)))
    policy.to(device).train()
    if isinstance(policy, SMPPolicy) and init_policy is None:
        # The experts diffuse z / z_scale (policy.py): fix the scale from the data under the initial weights,
        # on the same segments in every process, before the EMA copy is taken.
        ids = np.random.default_rng([tcfg.seed, 13]).permutation(len(train_set))[:Z_SCALE_SEGMENTS]
        policy.fit_z_scale(_to(to_tensors(train_set.batch(ids)), device))
    train_names = set(trainable_parameters(policy, req.finetune))
    for n, p in policy.named_parameters():
        p.requires_grad_(n in train_names)
    params = [p for n, p in policy.named_parameters() if n in train_names]
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(tcfg.warmup_steps, tcfg.steps))
    ema = EMA(policy, tcfg.ema_decay)
    # Each process draws its own diffusion noise and timesteps.
    torch.manual_seed(tcfg.seed * 1000 + ddp.rank)

    identity = {"config": cfg.to_dict(), "finetune": req.finetune, "init": str(req.init) if req.init else None,
                "world_size": ddp.world}
    start = 0
    state_path = sdir / STATE_FILE
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        saved = json.loads(state["identity"])
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
        if ddp.main and req.progress:
            print(f"resuming from {state_path} at step {start}")

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
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and tcfg.mixed_precision
                else contextlib.nullcontext())
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
        count += 1
        done = step + 1
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
                     "skipped": len(cache.skipped), "tasks": sorted({e.task for e in cache.episodes})},
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
    plain = preset(preset_name).to_dict()
    if overlay is not None:
        try:
            extra = yaml.safe_load(Path(overlay).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{overlay}: cannot read YAML ({exc})") from None
        if not isinstance(extra, dict):
            raise ConfigError(f"{overlay}: expected a mapping at the top level")
        plain = _merge(plain, extra)
    if steps is not None:
        plain["train"]["steps"] = steps
    return SMPConfig.from_dict(plain, where=str(overlay) if overlay else f"preset {preset_name}")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


