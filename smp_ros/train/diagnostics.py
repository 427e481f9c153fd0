"""Skill diagnostics of a trained SMP policy on demonstration episodes (A.4, Fig. 1 bottom).

For every control step of an episode the state-only router gives g_bar_t = E[g_t | s_t] and the
coverage rule gives the active set S_t (tau_m). From these:

- flip-rate: share of steps t >= 2 with argmax g_bar_t != argmax g_bar_{t-1} (A.4 note iv);
- segment length: lengths of the maximal runs of a constant argmax (steps, and seconds);
- |S|: mean size of the active set at tau_m;
- usage per task: mean g_bar per expert, and the share of steps each expert is active / the argmax.

Per episode a gate-trace figure (gate values over time, active set shaded, phase labels from the
bag's ``smp_episode.json`` when present) is written as PNG; all numbers go to ``diagnostics.json``.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smp_ros.config import ARM_JOINT_INDICES, ConfigError, SelectionConfig
from smp_ros.model.gates import dirichlet_mean
from smp_ros.model.selection import select_experts
from smp_ros.data.cache import DatasetCache
from smp_ros.data.dataset import WindowDataset, to_tensors
from smp_ros.gate_trace_plot import plot_gate_trace

EPISODE_FILE = "smp_episode.json"


def flip_rate(argmax: np.ndarray) -> float:
    """Share of consecutive step pairs whose argmax differs; 0 for fewer than 2 steps."""
    argmax = np.asarray(argmax)
    if argmax.size < 2:
        return 0.0
    return float(np.mean(argmax[1:] != argmax[:-1]))


def segment_lengths(argmax: np.ndarray) -> np.ndarray:
    """Lengths (steps) of the maximal runs of equal values, in order."""
    argmax = np.asarray(argmax)
    if argmax.size == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.flatnonzero(argmax[1:] != argmax[:-1]) + 1  # first index of every run but the first
    bounds = np.concatenate([[0], change, [argmax.size]])
    return np.diff(bounds)


def episode_gates(policy: Any, cache: DatasetCache, episode: int, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Router means (T, K) and active sets (T, K) bool for every control step of one cache episode."""
    trace = episode_trace(policy, cache, episode, batch, energy=False)
    return trace["gates"], trace["active"]


@torch.no_grad()
def episode_trace(policy: Any, cache: DatasetCache, episode: int, batch: int = 256,
                  energy: bool = True) -> dict[str, np.ndarray]:
    """One pass over the control steps of a cache episode: ``gates`` (T, K) router means, ``active`` (T, K)
    bool active sets and, with ``energy``, ``dropped`` and ``selection_mse`` (T,) (``selection_energy``) and
    ``energy_active`` (T,): the size of the smallest set of basis directions that holds the share τ_m of the
    demonstrated chunk's energy sum_h u_hi^2, the set the coverage rule would keep if its gates followed the
    demonstration exactly (with z = u / g, g_i ∝ |u_i| minimises the reconstruction's variance term, and then
    g_i^2 ∝ u_i^2: the coverage of ḡ^2 is a coverage of this energy); ``motion_energy_active`` (T,) the same
    for the chunk's motion, a minus its mean over the chunk's steps; ``constant_share`` (T,) the share of the
    chunk's energy sum_h |a_h|^2 that is its mean (H |mean_h a_h|^2), i.e. the pose held over the chunk."""
    m = policy.cfg
    cams = m.encoder.cameras if m.encoder.mode == "vision" else ()
    windows = WindowDataset(cache, [episode], m.obs_steps, m.horizon, cams, m.encoder.object_slots > 0)
    parts: dict[str, list[np.ndarray]] = {"gates": [], "active": [], "dropped": [], "selection_mse": [],
                                          "energy_active": [], "motion_energy_active": [], "constant_share": []}
    for lo in range(0, len(windows), batch):
        obs = {k: v.to(policy.device) for k, v in to_tensors(windows.batch(np.arange(lo, min(lo + batch, len(windows))))).items()}
        action = obs.pop("action")
        s = policy.encode(obs)
        g_bar = policy.route(s)  # (b, K)
        mask, _ = policy.select(g_bar)  # (b, K) bool
        parts["gates"].append(g_bar.float().cpu().numpy())
        parts["active"].append(mask.cpu().numpy())
        if energy:
            a = policy.chunk_target(action, obs["qpos"])  # (b, H, D), the model's action frame
            basis = policy.skill_basis(s).float()  # (b, D, K)
            u2 = (a @ basis).pow(2)  # (b, H, K)
            left_out = (u2 * (~mask).unsqueeze(1)).sum((1, 2))
            parts["dropped"].append((left_out / u2.sum((1, 2)).clamp_min(1e-12)).cpu().numpy())
            parts["selection_mse"].append((left_out / (a.shape[1] * a.shape[2])).cpu().numpy())
            parts["energy_active"].append(energy_set_size(u2.sum(1).cpu().numpy(), m.selection.tau_m))
            mean = a.mean(1, keepdim=True)
            motion = ((a - mean) @ basis).pow(2).sum(1)  # (b, K)
            parts["motion_energy_active"].append(energy_set_size(motion.cpu().numpy(), m.selection.tau_m))
            constant = mean.pow(2).sum((1, 2)) * a.shape[1]
            parts["constant_share"].append((constant / a.pow(2).sum((1, 2)).clamp_min(1e-12)).cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items() if v}


def energy_set_size(energy: np.ndarray, tau: float) -> np.ndarray:
    """Per row of ``energy`` (N, K) >= 0, the size of the smallest set of columns whose sum reaches ``tau``
    times the row's total (the largest first): the coverage rule of ``select_experts`` with the energy as the
    mass, uncapped; 1 for a row without energy."""
    rule = SelectionConfig(tau_m=tau, k=energy.shape[1], mass="linear")
    active, _ = select_experts(torch.as_tensor(energy, dtype=torch.float64), rule)
    return np.where(energy.sum(1) > 0, active.sum(-1).numpy(), 1)


def read_phases(bag: str | Path, t0_ns: int) -> list[dict[str, Any]]:
    """Phase spans of an episode as [{"name", "start", "end"}] in seconds since its first grid step.

    ``smp_episode.json`` gives either per-control-step labels, as the simulator writes them
    (``"phases": {"expert": [name per step], ...}`` with ``start_time_ns`` and ``control_rate_hz``),
    or spans (``"phases": [{"name", "start", "end"}]`` in seconds on the header-stamp clock).
    """
    path = Path(bag) / EPISODE_FILE
    if not path.is_file():
        return []
    try:
        info = json.loads(path.read_text())
        phases = info.get("phases", [])
        if isinstance(phases, dict):
            labels = phases.get("expert") or next(iter(phases.values()), [])
            origin = (int(info["start_time_ns"]) - t0_ns) / 1e9
            dt = 1.0 / float(info["control_rate_hz"])
            spans, begin = [], 0
            for k in range(1, len(labels) + 1):
                if k == len(labels) or labels[k] != labels[begin]:
                    spans.append({"name": str(labels[begin]), "start": origin + begin * dt, "end": origin + k * dt})
                    begin = k
            return spans
        return [{"name": str(p["name"]), "start": float(p["start"]) - t0_ns / 1e9,
                 "end": float(p["end"]) - t0_ns / 1e9} for p in phases]
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
        warnings.warn(f"{path}: phase labels unreadable ({exc}); expected per-step labels "
                      '{"phases": {"expert": [...]}, "start_time_ns", "control_rate_hz"} or spans '
                      '{"phases": [{"name", "start", "end"}]}', stacklevel=2)
        return []


def run_diagnostics(policy: Any, cache: DatasetCache, episodes: list[int], out_dir: str | Path,
                    plots: bool = True) -> dict[str, Any]:
    """Diagnostics over ``episodes`` of ``cache``; writes PNGs and diagnostics.json into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = policy.training
    policy.eval()
    rate = float(cache.index["control_rate_hz"])
    K = policy.cfg.num_experts
    per_episode, all_flips, all_pairs, all_runs, all_sizes = [], 0, 0, [], []
    all_dropped, all_selection_mse = [], []
    energy_keys = ("energy_active", "motion_energy_active", "constant_share")
    energy_parts: dict[str, list[np.ndarray]] = {k: [] for k in energy_keys}
    usage: dict[str, dict[str, Any]] = {}
    for e in episodes:
        info = cache.episodes[e]
        trace = episode_trace(policy, cache, e)
        gates, active, dropped, selection_mse = (trace[k] for k in ("gates", "active", "dropped", "selection_mse"))
        for k in energy_keys:
            energy_parts[k].append(trace[k])
        top = gates.argmax(1)
        runs = segment_lengths(top)
        sizes = active.sum(1)
        flips = int(np.sum(top[1:] != top[:-1]))
        all_flips += flips
        all_pairs += max(len(top) - 1, 0)
        all_runs.append(runs)
        all_sizes.append(sizes)
        u = usage.setdefault(info.task, {"steps": 0, "gate_sum": np.zeros(K), "active": np.zeros(K),
                                         "argmax": np.zeros(K), "dropped_energy": 0.0, "selection_mse": 0.0})
        u["steps"] += len(top)
        u["gate_sum"] += gates.sum(0)
        u["active"] += active.sum(0)
        u["argmax"] += np.bincount(top, minlength=K)
        u["dropped_energy"] += float(dropped.sum())
        u["selection_mse"] += float(selection_mse.sum())
        all_dropped.append(dropped)
        all_selection_mse.append(selection_mse)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(info.bag).name)
        record = {"episode": e, "bag": info.bag, "task": info.task, "steps": len(top),
                  "flip_rate": flip_rate(top), "mean_segment_steps": float(runs.mean()),
                  "mean_segment_s": float(runs.mean() / rate), "mean_active": float(sizes.mean()),
                  "dropped_energy": float(dropped.mean()), "selection_mse": float(selection_mse.mean()),
                  "figure": None}
        if plots:
            t = np.arange(len(top)) / rate
            fig = out_dir / f"gate_trace_{e:03d}_{stem}.png"
            title = (f"{Path(info.bag).name}  task={info.task}  flip-rate={record['flip_rate']:.3f}  "
                     f"mean segment={record['mean_segment_s']:.2f} s  mean |S|={record['mean_active']:.2f}")
            plot_gate_trace(fig, t, gates, active, title, read_phases(info.bag, info.t0_ns))
            record["figure"] = fig.name
        per_episode.append(record)
    policy.train(was_training)
    runs = np.concatenate(all_runs) if all_runs else np.zeros(0)
    sizes = np.concatenate(all_sizes) if all_sizes else np.zeros(0)
    summary = {
        "episodes": len(episodes), "steps": int(sizes.size),
        "flip_rate": all_flips / all_pairs if all_pairs else 0.0,
        "mean_segment_steps": float(runs.mean()) if runs.size else 0.0,
        "mean_segment_s": float(runs.mean() / rate) if runs.size else 0.0,
        "mean_active": float(sizes.mean()) if sizes.size else 0.0,
        # what the coverage rule would keep on the demonstrated chunk's energy and on its motion, and how much
        # of that energy is the pose held over the chunk (episode_trace)
        **{f"mean_{k}": float(np.concatenate(v).mean()) if v else 0.0 for k, v in energy_parts.items()},
        "tau_m": policy.cfg.selection.tau_m,
        "dropped_energy": float(np.concatenate(all_dropped).mean()) if all_dropped else 0.0,
        "selection_mse": float(np.concatenate(all_selection_mse).mean()) if all_selection_mse else 0.0,
    }
    usage_out = {task: {"steps": u["steps"], "mean_gate": (u["gate_sum"] / u["steps"]).tolist(),
                        "active_share": (u["active"] / u["steps"]).tolist(),
                        "argmax_share": (u["argmax"] / u["steps"]).tolist(),
                        "dropped_energy": u["dropped_energy"] / u["steps"],
                        "selection_mse": u["selection_mse"] / u["steps"]} for task, u in usage.items()}
    result = {"summary": summary, "usage_per_task": usage_out, "episodes": per_episode}
    (out_dir / "diagnostics.json").write_text(json.dumps(result, indent=1))
    return result


def selection_energy(policy: Any, cache: DatasetCache, episode: int, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """What the active set leaves out of the demonstrated chunk, per control step of one cache episode.

    With the demonstrated (normalized) chunk a (H, D) and the basis B(s) (D, K), the projections are
    u = a B (H, K); a = B (g ⊙ z) represents exactly B u when z = u / g, so the active set S can at best
    give B u_S. Returns (dropped, selection_mse), each (T,): ``dropped`` = sum_{h, i not in S} u_hi^2 /
    sum_{h, i} u_hi^2, the share of the in-span energy that the selection discards, and
    ``selection_mse`` = sum_{h, i not in S} u_hi^2 / (H D), the mean squared action error (normalizer
    units, as ``action_mse``) that the selection alone causes with perfect coefficients (B has
    orthonormal columns, so the dropped part's squared norm is that of its coefficients)."""
    trace = episode_trace(policy, cache, episode, batch)
    return trace["dropped"], trace["selection_mse"]


def step_stages(bag: str | Path, t0_ns: int, n: int) -> np.ndarray | None:
    """The task stage of each of the ``n`` grid steps of an episode (from ``smp_episode.json`` "stages",
    one per simulator control step from ``start_time_ns``), or None when the bag has none."""
    path = Path(bag) / EPISODE_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        stages = np.asarray(info["stages"], dtype=np.int64)
        origin = (t0_ns - int(info["start_time_ns"])) / 1e9
        k = np.round(origin * float(info["control_rate_hz"]) + np.arange(n)).astype(np.int64)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    if stages.size == 0:
        return None
    return stages[np.clip(k, 0, stages.size - 1)]


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(-1)


def normalized_mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """NMI(a; b) = I(a; b) / sqrt(H(a) H(b)) of two label arrays, in [0, 1]; 0 when either is constant."""
    a, b = np.unique(a, return_inverse=True)[1], np.unique(b, return_inverse=True)[1]
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    ha, hb = _entropy(pa), _entropy(pb)
    if ha <= 0 or hb <= 0:
        return 0.0
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    return mi / float(np.sqrt(ha * hb))


@torch.no_grad()
def gate_metrics(policy: Any, cache: DatasetCache, episodes: list[int]) -> dict[str, float]:
    """Training-time gate health on held-out episodes, from the state-only router (what runs on the robot):

    - ``gate_entropy``: mean entropy of g_bar (nats; log K = uniform, 0 = one expert);
    - ``mean_active``: mean |S| at the model's tau_m (coverage rule, capped at k) and ``mean_active_uncapped``
      with the cap at K, which shows how many experts the coverage really asks for;
    - ``flip_rate``: share of consecutive steps whose argmax expert differs (A.4 iv);
    - ``phase_nmi``: normalised mutual information between the argmax expert and the task stage of the
      step, within each task (weighted by steps): 0 = expert use unrelated to the phase, 1 = each phase
      has its own expert; ``task_nmi`` the same between argmax expert and task;
    - ``max_gate``: mean of the largest gate;
    - ``action_mse``: held-out action error (``held_out_action_error``), comparable across configurations
      where the loss terms are not (L_coeff's targets depend on the gates, L_recon on how g_t is drawn).
    """
    from smp_ros.model.selection import select_experts

    was_training = policy.training
    policy.eval()
    K = policy.cfg.num_experts
    uncapped_cfg = dataclass_replace(policy.cfg.selection, k=K)
    gates_all, sizes, sizes_uncapped, flips, pairs, argmaxes, phases = [], [], [], 0, 0, [], []
    for e in episodes:
        info = cache.episodes[e]
        gates, active = episode_gates(policy, cache, e)
        g = torch.from_numpy(gates)
        uncapped, _ = select_experts(g, uncapped_cfg)
        top = gates.argmax(1)
        flips += int(np.sum(top[1:] != top[:-1]))
        pairs += max(len(top) - 1, 0)
        gates_all.append(gates)
        sizes.append(active.sum(1))
        sizes_uncapped.append(uncapped.numpy().sum(1))
        stages = step_stages(info.bag, info.t0_ns, len(top))
        if stages is not None:
            argmaxes.append(top)
            phases.append(info.task_id * 100 + stages)
    out_action = held_out_action_error(policy, cache, episodes)
    policy.train(was_training)
    if not gates_all:
        return {}
    gates = np.concatenate(gates_all)
    out = {"gate_entropy": float(_entropy(gates).mean()), "max_gate": float(gates.max(1).mean()),
           "mean_active": float(np.concatenate(sizes).mean()),
           "mean_active_uncapped": float(np.concatenate(sizes_uncapped).mean()),
           "flip_rate": flips / pairs if pairs else 0.0, **out_action}
    if argmaxes:
        top, phase = np.concatenate(argmaxes), np.concatenate(phases)
        task = phase // 100
        # Within each task: does the expert in charge change with the stage? (Across tasks the task id
        # alone could explain a different expert, which is not a skill switching at a phase.)
        per_task = [(normalized_mutual_information(top[task == t], phase[task == t]), int((task == t).sum()))
                    for t in np.unique(task)]
        out["phase_nmi"] = float(sum(v * n for v, n in per_task) / sum(n for _, n in per_task))
        out["task_nmi"] = normalized_mutual_information(top, task)
    return out


def phase_usage(policy: Any, cache: DatasetCache, episodes: list[int]) -> dict[str, Any]:
    """Mean router gate per (task, stage) over ``episodes``: {task: {stage: [K]}} (steps without stage
    labels are left out)."""
    sums: dict[str, dict[int, np.ndarray]] = {}
    counts: dict[str, dict[int, int]] = {}
    for e in episodes:
        info = cache.episodes[e]
        gates, _ = episode_gates(policy, cache, e)
        stages = step_stages(info.bag, info.t0_ns, len(gates))
        if stages is None:
            continue
        for st in np.unique(stages):
            sel = stages == st
            sums.setdefault(info.task, {}).setdefault(int(st), np.zeros(gates.shape[1]))
            sums[info.task][int(st)] += gates[sel].sum(0)
            counts.setdefault(info.task, {}).setdefault(int(st), 0)
            counts[info.task][int(st)] += int(sel.sum())
    return {task: {str(st): (v / counts[task][st]).tolist() for st, v in sorted(per.items())}
            for task, per in sums.items()}


def _held_out_windows(policy: Any, cache: DatasetCache, episodes: list[int], windows: int,
                      seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """``windows`` fixed windows (a seeded draw) of ``episodes``: the observation batch on the policy's device
    and the demonstrated chunks (B, H, D) raw; None without any window."""
    m = policy.cfg
    cams = m.encoder.cameras if m.encoder.mode == "vision" else ()
    data = WindowDataset(cache, episodes, m.obs_steps, m.horizon, cams, m.encoder.object_slots > 0)
    if len(data) == 0:
        return None
    ids = np.sort(np.random.default_rng(seed).permutation(len(data))[:windows])
    batch = {k: v.to(policy.device) for k, v in to_tensors(data.batch(ids)).items()}
    return batch, batch.pop("action").float()


@torch.no_grad()
def held_out_action_error(policy: Any, cache: DatasetCache, episodes: list[int], windows: int = 128,
                          seed: int = 0) -> dict[str, float]:
    """Mean squared error, in the normalizer's [-1, 1] units of the model's action frame, between the action
    chunk the policy samples (Algorithm 2, its own selection) and the demonstrated one, on ``windows`` fixed
    held-out windows with fixed sampling noise; also with every expert active (``action_mse_all``) for SMP.
    ``joint_mse_rad2`` (``_all``) is the same error over the arm joints in rad^2, absolute targets: unlike
    the normalized figure it compares models whose normalizers or action frames differ."""
    m = policy.cfg
    held_out = _held_out_windows(policy, cache, episodes, windows, seed)
    if held_out is None:
        return {}
    batch, demo = held_out
    target = policy.chunk_target(demo, batch["qpos"])
    joints = list(ARM_JOINT_INDICES)
    out = {}
    variants = [("action_mse", None)]
    if hasattr(policy, "experts"):
        variants.append(("action_mse_all", list(range(m.num_experts))))
    for name, active in variants:
        pred = policy.predict_action(batch, generator=torch.Generator(policy.device).manual_seed(seed), active=active)
        out[name] = float((policy.chunk_target(pred.action, batch["qpos"]) - target).pow(2).mean())
        out[name.replace("action_mse", "joint_mse_rad2")] = float((pred.action - demo)[..., joints].pow(2).mean())
    return out


@torch.no_grad()
def horizon_error(policy: Any, cache: DatasetCache, episodes: list[int], windows: int = 512,
                  seed: int = 0) -> dict[str, list[float]]:
    """Per chunk step h, the RMS error over the arm joints (rad, absolute targets) of the chunk the policy
    samples against the demonstrated one, on ``windows`` fixed held-out windows with fixed noise.

    The steps a real-time loop executes are the first few of each chunk (it re-plans every few control
    steps), where the demonstrated motion is smallest, so an error that is small over the whole chunk can
    still be large against what is executed. Keys: ``demo_motion`` the RMS of the demonstrated a_{t+h} - q_t
    (the scale to compare with), ``sampled`` the policy's own error; for SMP also ``all_experts`` (every
    expert active) and ``in_span``: the error of B(s) B(s)^T a, the demonstrated chunk (in the model's
    action frame) projected on the span of the basis, what perfect coefficients of every expert give;
    and, to tell which factor of a = B (g ⊙ z) errs, ``router_gates_target_coefficients``: the router's
    g_bar with the coefficients the experts are trained to produce (eq. 34, ``policy.coefficient_target``;
    under the amortized posterior's E_q[g | s, a] by default), i.e. the error of the gates alone, and
    ``target_gates_sampled_coefficients``: every expert's sampled coefficients times the gates they were
    trained under (E_q[g | s, a] by default), i.e. the error of the coefficients alone."""
    m = policy.cfg
    held_out = _held_out_windows(policy, cache, episodes, windows, seed)
    if held_out is None:
        return {}
    batch, demo = held_out
    joints = list(ARM_JOINT_INDICES)

    def rms(chunk: torch.Tensor) -> list[float]:
        return (chunk[..., joints] - demo[..., joints]).pow(2).mean((0, 2)).sqrt().cpu().tolist()

    q = batch["qpos"][:, -1:, :].float()
    out = {"demo_motion": (demo - q)[..., joints].pow(2).mean((0, 2)).sqrt().cpu().tolist()}
    variants = [("sampled", None)] + ([("all_experts", list(range(m.num_experts)))] if hasattr(policy, "experts") else [])
    for name, active in variants:
        pred = policy.predict_action(batch, generator=torch.Generator(policy.device).manual_seed(seed), active=active)
        out[name] = rms(pred.action.float())
    if hasattr(policy, "experts"):
        s = policy.encode(batch)
        Bm = policy.skill_basis(s).float()  # (B, D, K)
        a = policy.chunk_target(demo, batch["qpos"])  # (B, H, D) normalized, the model's frame

        def decoded(gates: torch.Tensor, z: torch.Tensor) -> list[float]:  # a = B (g ⊙ z), eq. 1
            return rms(policy.absolute_chunk(policy.decode(Bm, gates.float(), z.float()), batch["qpos"]))

        projected = policy.normalizer.unnormalize("action", (a @ Bm) @ Bm.transpose(-1, -2))
        out["in_span"] = rms(policy.absolute_chunk(projected, batch["qpos"]))
        # Which factor of a = B (g ⊙ z) errs: the router's gates or the experts' coefficients.
        E_g = dirichlet_mean(policy.gates.posterior(s, a)).float()  # E_q[g | s, a]
        beta_router = policy.gates.router(s)
        z_target = policy.coefficient_target(a, Bm, E_g, beta_router)  # (B, H, K), eq. 34
        g_bar = policy.route(s)
        out["router_gates_target_coefficients"] = decoded(g_bar, z_target)
        every = torch.arange(m.num_experts, device=s.device)
        x = policy.initial_noise(s.shape[0], torch.Generator(policy.device).manual_seed(seed))
        anchor = policy.expert_anchor(batch["qpos"], Bm, g_bar)
        z = policy.scatter_coefficients(policy.denoise_experts(x, s, every, anchor),
                                        torch.ones_like(E_g, dtype=torch.bool), every)  # (B, H, K)
        out["target_gates_sampled_coefficients"] = decoded(policy.coefficient_gate(E_g, beta_router), z)
    return out


def _ranked(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(B, H, K) values per expert -> the same per gate rank, ``order`` (B, K) the experts by descending gate."""
    return torch.gather(t, 2, order.unsqueeze(1).expand_as(t))


@torch.no_grad()
def coefficient_error_by_rank(policy: Any, cache: DatasetCache, episodes: list[int], windows: int = 256,
                              seed: int = 0) -> dict[str, list[float]]:
    """How well each expert's coefficients are generated, by the rank of its router gate in each window
    (rank 1 = the largest E[g | s]), on ``windows`` fixed held-out windows with fixed sampling noise,
    every expert denoised. Lists of K values, one per rank, in the normalizer's units of the model's
    action frame: ``router_gate`` and ``target_gate`` (the gate the targets are divided by, eq. 34) means;
    ``projection_rms`` the RMS of u = B(s)^T a (the action's component along the expert's direction);
    ``target_x_rms`` the RMS of the diffusion variable the expert is trained on, x = z_sg / z_scale;
    ``sampled_x_error_rms`` the RMS of the sampled x minus that target; ``contribution_error_rms`` the
    same error decoded, g z_scale (x_sampled - x), i.e. the error of the action along b_i. An expert whose
    x error is as large as its target's RMS has learned nothing about its coefficient beyond its scale."""
    m = policy.cfg
    held_out = _held_out_windows(policy, cache, episodes, windows, seed)
    if held_out is None:
        return {}
    batch, demo = held_out
    s = policy.encode(batch)
    Bm = policy.skill_basis(s).float()  # (B, D, K)
    a = policy.chunk_target(demo, batch["qpos"])  # (B, H, D)
    E_g = dirichlet_mean(policy.gates.posterior(s, a)).float()
    beta_router = policy.gates.router(s)
    gate = policy.coefficient_gate(E_g, beta_router).float()  # (B, K)
    scale = policy.coefficients(torch.ones((), device=s.device)).float()
    x_target = policy.coefficient_target(a, Bm, E_g, beta_router).float() / scale  # (B, H, K)
    every = torch.arange(m.num_experts, device=s.device)
    x = policy.initial_noise(s.shape[0], torch.Generator(policy.device).manual_seed(seed))
    g_bar = policy.route(s)
    x_sampled = policy.denoise_experts(x, s, every, policy.expert_anchor(batch["qpos"], Bm, g_bar))
    x_sampled = x_sampled[:, :, 0].transpose(1, 2).float()  # (B, H, K)
    order = g_bar.float().argsort(-1, descending=True)  # (B, K): experts by router gate

    def by_rank(t: torch.Tensor) -> list[float]:  # (B, H, K) -> RMS per rank
        return _ranked(t, order).pow(2).mean((0, 1)).sqrt().cpu().tolist()

    def mean_by_rank(t: torch.Tensor) -> list[float]:  # (B, K) -> mean per rank
        return torch.gather(t, 1, order).mean(0).cpu().tolist()

    error = x_sampled - x_target
    return {"router_gate": mean_by_rank(g_bar.float()), "target_gate": mean_by_rank(gate),
            "projection_rms": by_rank(a.float() @ Bm), "target_x_rms": by_rank(x_target),
            "sampled_x_error_rms": by_rank(error),
            "contribution_error_rms": by_rank(gate.unsqueeze(1) * scale * error)}


@torch.no_grad()
def error_along_basis_by_rank(policy: Any, reference: Any, cache: DatasetCache, episodes: list[int],
                              windows: int = 256, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """Where a reference policy (e.g. Diffusion Policy) errs less than SMP: the error of each sampled chunk
    against the demonstrated one, projected on SMP's skill basis B(s) and ranked by SMP's router gate
    (rank 1 = the largest E[g | s]), on ``windows`` fixed held-out windows with fixed sampling noise.

    The chunks are compared in SMP's normalizer units of its action frame, so the components along the b_i
    of every policy are commensurable. Each entry holds ``first_step`` (the RMS of b_i^T (a_hat - a) at
    h = 0, the step a real-time loop executes first) and ``chunk`` (over all H steps), one value per rank:
    ``demo`` the demonstrated chunk's own component (the scale to compare with), ``smp_sampled`` SMP with its
    own selection, ``smp_all_experts`` every expert active, ``reference`` the reference policy's chunk. The
    two models must share T_o and H so that they see the same windows."""
    m, r = policy.cfg, reference.cfg
    if (m.obs_steps, m.horizon) != (r.obs_steps, r.horizon):
        raise ConfigError(f"the reference model has T_o = {r.obs_steps}, H = {r.horizon}; the SMP model "
                         f"T_o = {m.obs_steps}, H = {m.horizon}: they must be equal to compare the same windows")
    held_out = _held_out_windows(policy, cache, episodes, windows, seed)
    ref_held_out = _held_out_windows(reference, cache, episodes, windows, seed)
    if held_out is None or ref_held_out is None:
        return {}
    batch, demo = held_out
    ref_batch, ref_demo = ref_held_out
    if not torch.equal(demo.cpu(), ref_demo.cpu()):
        raise ConfigError("the reference model's windows differ from the SMP model's (different data settings)")
    s = policy.encode(batch)
    Bm = policy.skill_basis(s).float()  # (B, D, K)
    a = policy.chunk_target(demo, batch["qpos"]).float()  # (B, H, D)
    order = policy.route(s).float().argsort(-1, descending=True)  # (B, K)

    def along(delta: torch.Tensor) -> dict[str, list[float]]:  # (B, H, D) -> per-rank RMS of b_i^T delta
        ranked = _ranked(delta @ Bm, order)  # (B, H, K)
        return {"first_step": ranked[:, 0].pow(2).mean(0).sqrt().cpu().tolist(),
                "chunk": ranked.pow(2).mean((0, 1)).sqrt().cpu().tolist()}

    def error(p: Any, obs: dict[str, torch.Tensor], active: list[int] | None = None) -> dict[str, list[float]]:
        pred = p.predict_action(obs, generator=torch.Generator(p.device).manual_seed(seed), active=active)
        return along(policy.chunk_target(pred.action.float().to(a.device), batch["qpos"]).float() - a)

    return {"demo": along(a), "smp_sampled": error(policy, batch),
            "smp_all_experts": error(policy, batch, list(range(m.num_experts))),
            "reference": error(reference, ref_batch)}
