"""The gate-trace figure: the router's gates E[g | s] of every expert over an episode, the active set S_t
beneath them and the task's phases behind them. Shared by training diagnostics and the simulated demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot_gate_trace(path: Path, t: np.ndarray, gates: np.ndarray, active: np.ndarray, title: str,
                    phases: list[dict[str, Any]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T, K = gates.shape
    colors = plt.get_cmap("tab10" if K <= 10 else "tab20")(np.arange(K) % (10 if K <= 10 else 20))
    fig, (ax, ax_s) = plt.subplots(2, 1, figsize=(10, 4.2), sharex=True, height_ratios=[3, 1.2])
    dt = t[1] - t[0] if T > 1 else 0.05
    for i in range(K):
        ax.plot(t, gates[:, i], color=colors[i], lw=1.4, label=f"expert {i}")
        # active set shaded under each expert's curve
        ax.fill_between(t, 0, gates[:, i], where=active[:, i], step=None, color=colors[i], alpha=0.18, lw=0)
        ax_s.fill_between(t, i - 0.4, i + 0.4, where=active[:, i], color=colors[i], step="mid", lw=0)
    for p in phases:
        ax.axvspan(p["start"], p["end"], color="0.5", alpha=0.08, lw=0)
        ax.axvline(p["start"], color="0.4", lw=0.6, ls="--")
        ax.text((p["start"] + p["end"]) / 2, 1.02, p["name"], ha="center", va="bottom", fontsize=8,
                transform=ax.get_xaxis_transform())
    ax.set_ylim(0, 1)
    ax.set_xlim(t[0], t[-1] + dt)
    ax.set_ylabel("router gate  E[g | s]")
    ax.set_title(title, fontsize=9, pad=14 if phases else 6)
    ax.legend(loc="upper right", fontsize=7, ncol=min(K, 8), frameon=False)
    ax_s.set_yticks(range(K))
    ax_s.set_ylim(-0.5, K - 0.5)
    ax_s.set_ylabel("active S_t", fontsize=8)
    ax_s.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
