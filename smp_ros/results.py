"""The keys of evaluation results (JSON), written once for every command that writes or reads them.

Two levels, one name each, whichever command ran the episodes (``smp-ros eval``, ``bringup --episodes``,
``demo``, ``soak``, ``experiment``):

- an episode: ``success`` (bool) and ``progress`` (the task's stage score, 0..1);
- a summary of episodes (per task, overall, per method): ``success_rate`` and ``mean_progress``.

Files written before the names agreed used ``progress`` for a summary's mean (bringup, demo,
experiment) and ``success`` for a summary's rate (experiment); :func:`summary_value` still reads
them. :func:`wilson_interval` is the confidence interval every report gives a success rate. Imports nothing
from the package, so every part of the package may use it.
"""

from __future__ import annotations

import math
from typing import Any

# One episode.
SUCCESS = "success"
PROGRESS = "progress"
# A summary of episodes.
SUCCESS_RATE = "success_rate"
MEAN_PROGRESS = "mean_progress"

# A summary key -> the name it had in older result files.
_OLD_SUMMARY_NAMES = {MEAN_PROGRESS: PROGRESS, SUCCESS_RATE: SUCCESS}


def summarize(episodes: list[dict[str, Any]]) -> dict[str, float]:
    """``success_rate`` and ``mean_progress`` of episode records (0.0 for none)."""
    n = max(len(episodes), 1)
    return {SUCCESS_RATE: sum(bool(e[SUCCESS]) for e in episodes) / n,
            MEAN_PROGRESS: sum(float(e[PROGRESS]) for e in episodes) / n}


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion; (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summary_value(summary: dict[str, Any], key: str, where: str = "results") -> Any:
    """``summary[key]``, or the value under the key's older name in a file written before the rename."""
    if key in summary:
        return summary[key]
    old = _OLD_SUMMARY_NAMES.get(key)
    if old is not None and old in summary:
        return summary[old]
    expected = f"'{key}'" + (f" (or the older '{old}')" if old else "")
    raise KeyError(f"{where}: no {expected} among {sorted(summary)}")


# The harness's two arm backends rank policies differently (docs/RESULTS.md 3i): compare only within one.
HARNESS_BACKEND_NOTE = ("piper: targets through piper_sdk and the emulated firmware; direct: applied to the "
                        "simulated arms; success rates from the two backends are not comparable")
