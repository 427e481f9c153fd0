"""Soak figures of a running system: command deadlines and jitter, holds by cause, memory growth.

ROS-free: ``smp_ros.nodes.soak`` feeds it the command stamps, the policy's and the arms' status
messages (as plain values) and memory samples, and it computes the report. Definitions (the
figures of BENCHMARKS.md, "Soak"), with T = 1 / command rate, the configured command period:

- **interval**: the time between two consecutive commands of one arm, by their header stamps (the
  publisher's clock right before publishing: timer lateness, not transport).
- **excused interval**: one during which the policy declared a hold (a ``policy_status`` with
  ``holding`` stamped inside it). No command is due while the policy holds; holds are reported
  separately, by cause.
- **missed command deadline**: a command period, while a command was due, in which no command was
  published. Command k is due T after command k-1; a period counts as missed when no command came
  within half a period of its due time, so an unexcused interval d misses
  ``max(0, floor(d / T - 0.5))`` periods (d < 1.5 T: none; 1.5 T <= d < 2.5 T: one, ...).
  Due periods = unexcused intervals + missed periods; the share is missed / due.
- **late command**: an unexcused interval longer than 2 T (the command came more than one whole
  period after it was due).
- **jitter**: |d - T| over the unexcused intervals, p50 / p99 / max.
- **hold time by cause**: the policy's state is piecewise constant between its status messages
  (it publishes one on every change of cause and periodically), so the time from a holding
  status to the next status is held time of that status' cause (numbers stripped: ``cause_of``).
  The same for each arm's ``arm_status`` (time not ``running``, by state and reason).
- **memory growth**: total RSS of the process and all its descendants (the inference worker) at
  the end against the first sample after the warm-up, in percent.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smp_ros.runtime.guard import cause_of

RUNNING = "running"


@dataclass
class StatusSample:
    """One status message as plain values: ``stamp`` (s), held or not, and why."""

    stamp: float
    holding: bool
    reason: str
    counters: dict = field(default_factory=dict)  # cumulative counters the message carries


def command_figures(stamps, holds, period_s: float) -> dict:
    """Deadline and jitter figures of one arm's command stream (see the module docstring).

    ``stamps``: command header stamps in publication order (s); ``holds``: stamps of the policy's
    holding status messages (s); ``period_s``: the configured command period T.
    """
    if period_s <= 0:
        raise ValueError(f"period_s: expected > 0, got {period_s}")
    t = np.asarray(stamps, dtype=float)
    d = np.diff(t)  # (N-1,) intervals
    h = np.sort(np.asarray(holds, dtype=float))
    if d.size:
        # An interval (t[i], t[i+1]] is excused when a holding status lies inside it.
        first = np.searchsorted(h, t[:-1], side="right")  # first hold after t[i]
        excused = (first < h.size) & (h[np.minimum(first, max(h.size - 1, 0))] <= t[1:]) if h.size else \
            np.zeros(d.shape, dtype=bool)
    else:
        excused = np.zeros(0, dtype=bool)
    due = d[~excused]
    missed = np.maximum(0, np.floor(due / period_s - 0.5)).astype(int) if due.size else np.zeros(0, int)
    jitter = np.abs(due - period_s)
    due_periods = int(due.size + missed.sum())

    def pct(values, q):
        return float(np.percentile(values, q)) if values.size else None

    return {
        "commands": int(t.size),
        "intervals": int(d.size),
        "excused_intervals": int(excused.sum()),
        "unexcused_intervals": int(due.size),
        "due_periods": due_periods,
        "missed_deadlines": int(missed.sum()),
        "missed_share": float(missed.sum() / due_periods) if due_periods else None,
        "late_commands": int((due > 2 * period_s).sum()),
        "interval_p50_ms": _ms(pct(due, 50)),
        "interval_p99_ms": _ms(pct(due, 99)),
        "jitter_p50_ms": _ms(pct(jitter, 50)),
        "jitter_p99_ms": _ms(pct(jitter, 99)),
        "jitter_max_ms": _ms(float(jitter.max()) if jitter.size else None),
        # Achieved rate while a command was due (held time left out).
        "commanding_rate_hz": float(due.size / due.sum()) if due.size and due.sum() > 0 else None,
        "stamps_monotonic": bool(np.all(d > 0)) if d.size else True,
    }


def hold_figures(samples: list[StatusSample], end: float, *, running=None) -> dict:
    """Held time and hold entries by cause from a piecewise-constant status stream.

    ``running(sample)`` says whether a sample is not a hold (default: ``not sample.holding``).
    ``end`` closes the last state. Returns seconds held by cause, entries (changes into a cause)
    by cause, the total held time and the observed span.
    """
    not_held = running or (lambda s: not s.holding)
    samples = sorted(samples, key=lambda s: s.stamp)
    seconds: dict[str, float] = defaultdict(float)
    entries: Counter = Counter()
    previous = None
    for i, s in enumerate(samples):
        nxt = samples[i + 1].stamp if i + 1 < len(samples) else max(end, s.stamp)
        if not not_held(s):
            cause = cause_of(s.reason) or "(no reason given)"
            seconds[cause] += nxt - s.stamp
            if cause != previous:
                entries[cause] += 1
            previous = cause
        else:
            previous = None
    span = (max(end, samples[-1].stamp) - samples[0].stamp) if samples else 0.0
    held = float(sum(seconds.values()))
    return {"span_s": float(span), "held_s": held, "held_share": held / span if span > 0 else None,
            "by_cause": {c: {"seconds": float(v), "entries": int(entries[c])}
                         for c, v in sorted(seconds.items(), key=lambda kv: -kv[1])}}


def latest_counters(samples: list[StatusSample]) -> dict:
    """The cumulative counters of the newest sample (they only grow while a node lives)."""
    if not samples:
        return {}
    return dict(max(samples, key=lambda s: s.stamp).counters)


# ---------------------------------------------------------------------- memory


def _read_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return 0  # a zombie has no VmRSS line


def _children(pid: int) -> list[int]:
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except FileNotFoundError:
        return "?"
    return " ".join(Path(a).name if i == 0 else a for i, a in enumerate(argv[:4]))[:80]


def process_tree_rss(root: int | None = None) -> dict[int, dict]:
    """RSS (MiB) and command line of ``root`` (default: this process) and all its descendants.
    Linux ``/proc``: the soak runs where the simulator runs."""
    root = os.getpid() if root is None else root
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        rss = _read_rss_kib(pid)
        if rss is None:
            continue
        out[pid] = {"rss_mib": rss / 1024.0, "name": _name(pid)}
        todo += _children(pid)
    return out


def memory_figures(samples: list[tuple[float, dict[int, dict]]], warmup_s: float) -> dict:
    """Total RSS after the warm-up against the newest sample. ``samples``: (seconds since start,
    ``process_tree_rss()``) in time order."""
    if not samples:
        return {"samples": 0}
    total = [(t, sum(p["rss_mib"] for p in procs.values())) for t, procs in samples]
    base_i = next((i for i, (t, _) in enumerate(total) if t >= warmup_s), None)
    end_t, end_total = total[-1]
    out = {"samples": len(samples), "warmup_s": float(warmup_s), "end_s": float(end_t),
           "end_total_mib": float(end_total), "peak_total_mib": float(max(v for _, v in total)),
           "processes_end": [dict(pid=pid, **p) for pid, p in samples[-1][1].items()],
           # The whole series (seconds, MiB): a steady climb and a step after warm-up look alike
           # in the two-point growth figure.
           "total_mib_series": [[round(t, 1), round(v, 1)] for t, v in total]}
    if base_i is None or base_i == len(total) - 1:
        out.update(after_warmup_s=None, after_warmup_total_mib=None, growth_pct=None)
        return out
    base_t, base = total[base_i]
    out.update(after_warmup_s=float(base_t), after_warmup_total_mib=float(base),
               growth_pct=float(100.0 * (end_total - base) / base) if base > 0 else None,
               processes_after_warmup=[dict(pid=pid, **p) for pid, p in samples[base_i][1].items()])
    return out


# ---------------------------------------------------------------------- report


TARGETS = {"missed_share_max": 0.001, "jitter_p99_ms_max": 2.0, "memory_growth_pct_max": 5.0}


def verdict(report: dict) -> dict:
    """Each figure against the issue's targets (met / not met / no data)."""
    worst = report.get("commands", {}).get("worst", {})
    growth = report.get("memory", {}).get("growth_pct")

    def check(value, limit):
        return None if value is None else bool(value <= limit)

    return {"missed_deadlines": check(worst.get("missed_share"), TARGETS["missed_share_max"]),
            "jitter_p99": check(worst.get("jitter_p99_ms"), TARGETS["jitter_p99_ms_max"]),
            "memory_growth": check(growth, TARGETS["memory_growth_pct_max"])}


def worst_of(per_arm: dict[str, dict]) -> dict:
    """The headline: per figure, the worse of the arms (they are commanded in the same tick)."""
    keys = ("missed_share", "jitter_p50_ms", "jitter_p99_ms", "jitter_max_ms", "interval_p99_ms")
    out = {}
    for k in keys:
        values = [a[k] for a in per_arm.values() if a.get(k) is not None]
        out[k] = max(values) if values else None
    out["missed_deadlines"] = max((a["missed_deadlines"] for a in per_arm.values()), default=0)
    out["late_commands"] = max((a["late_commands"] for a in per_arm.values()), default=0)
    return out


def write_json(path: str | Path, report: dict) -> None:
    """Atomically (write, then rename): a run killed at any moment leaves the last whole report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000.0 * seconds


def format_table(report: dict) -> str:
    """The report as a short table for the terminal."""
    def f(value, spec=".2f", unit=""):
        if value is None:
            return "-"
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return f"{value:{spec}}{unit}"

    c = report["commands"]
    lines = [f"soak: {report['elapsed_s']:.0f} s of {report['duration_s']:.0f} s, "
             f"{report['episodes']['completed']} episodes ({report['episodes']['successes']} successes), "
             f"command rate {report['command_rate_hz']:g} Hz (T = {1000 / report['command_rate_hz']:.1f} ms)",
             f"{'arm':<7}{'commands':>9}{'due':>9}{'missed':>8}{'share':>9}{'late':>6}"
             f"{'jit p50':>9}{'jit p99':>9}{'jit max':>9}{'Hz cmd':>8}"]
    for arm, a in c["arms"].items():
        lines.append(f"{arm:<7}{a['commands']:>9}{a['due_periods']:>9}{a['missed_deadlines']:>8}"
                     f"{f(a['missed_share'] and 100 * a['missed_share'], '.3f', '%'):>9}{a['late_commands']:>6}"
                     f"{f(a['jitter_p50_ms'], '.2f'):>9}{f(a['jitter_p99_ms'], '.2f'):>9}"
                     f"{f(a['jitter_max_ms'], '.1f'):>9}{f(a['commanding_rate_hz'], '.1f'):>8}")
    p = report["holds"]["policy"]
    lines.append(f"policy held {f(p['held_s'], '.1f')} s of {f(p['span_s'], '.1f')} s "
                 f"({f(p['held_share'] and 100 * p['held_share'], '.1f', '%')}); by cause:")
    for cause, v in list(p["by_cause"].items())[:8]:
        lines.append(f"  {v['seconds']:8.1f} s {v['entries']:6d} x  {cause[:90]}")
    for arm, a in report["holds"]["arms"].items():
        top = ", ".join(f"{k[:50]} {v['seconds']:.1f} s" for k, v in list(a["by_cause"].items())[:3]) or "none"
        lines.append(f"{arm} arm not running {f(a['held_s'], '.1f')} s: {top}")
    k = report["counters"]
    lines.append(f"callback errors: policy {k.get('policy_callback_errors', 0)}, arms "
                 f"{k.get('arm_callback_errors', 0)}; worker restarts {k.get('worker_restarts', 0)}; "
                 f"skipped planning cycles {k.get('skipped_cycles', 0)}; command periods with no tick "
                 f"{k.get('skipped_command_periods', 0)}; late inference {k.get('inference_missed_deadlines', 0)}"
                 f" of {k.get('chunks', 0)} chunks")
    for arm, a in report.get("arm_counters", {}).items():
        # Refused commands mean another publisher was heard: another system in this ROS domain.
        lines.append(f"{arm} arm: {a.get('commands_executed', 0)} commands executed, {a.get('commands_rejected', 0)} "
                     f"rejected, {a.get('commands_not_owner', 0)} refused (another publisher)")
    m = report["memory"]
    lines.append(f"memory: {f(m.get('after_warmup_total_mib'), '.0f')} MiB after warm-up "
                 f"({f(m.get('after_warmup_s'), '.0f')} s) -> {f(m.get('end_total_mib'), '.0f')} MiB at "
                 f"{f(m.get('end_s'), '.0f')} s: growth {f(m.get('growth_pct'), '.2f', '%')} "
                 f"({len(m.get('processes_end', []))} processes)")
    v = report["verdict"]
    lines.append("targets: " + ", ".join(f"{k} {'met' if ok else 'NOT met' if ok is False else 'no data'}"
                                         for k, ok in v.items()))
    return "\n".join(lines)
