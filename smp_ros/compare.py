"""Two policies' closed-loop results compared episode by episode: ``smp-ros compare``.

    smp-ros compare --a smp_s100.json smp_s200.json --b dp_s100.json dp_s200.json
    smp-ros compare --a smp0_s100.json --a smp1_s100.json --b dp0_s100.json --b dp1_s100.json --json cmp.json

Each ``--a`` / ``--b`` names the result files (``smp-ros eval --json``) of one trained model; repeating the option
adds another training seed, and the i-th ``--a`` is paired with the i-th ``--b``. Episodes are paired on
(training seed, task, episode seed): the same scene, so whatever one policy solves and the other does not is a
difference between the policies, not between scenes. Printed per task and over all: successes, the success rate
with its 95% Wilson interval, and over all the discordant pairs with the exact two-sided McNemar p (the binomial
test of the discordant counts at 1/2). Episodes that only one side ran are left out and counted.
"""

from __future__ import annotations

import argparse
import json
from math import comb
from pathlib import Path

from smp_ros.config import ConfigError
from smp_ros.report import Column, format_table, write_json
from smp_ros.results import SUCCESS, wilson_interval

Key = tuple[int, str, int]  # (training seed group, task, episode seed)


def exact_mcnemar(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p: the probability, under 'each discordant pair is as likely to favour either
    side', of a split at least as uneven as ``a_only`` / ``b_only`` (1.0 with no discordant pairs)."""
    if a_only < 0 or b_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got {a_only}, {b_only}")
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(a_only, b_only) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def load_outcomes(groups: list[list[Path]], option: str) -> dict[Key, bool]:
    """{(group, task, episode seed): success} from ``smp-ros eval`` result files, one group per trained model."""
    out: dict[Key, bool] = {}
    for g, files in enumerate(groups):
        for path in files:
            try:
                doc = json.loads(Path(path).read_text())
                tasks = doc["tasks"]
                records = [(task, int(e["seed"]), bool(e[SUCCESS])) for task, r in tasks.items() for e in r["episodes"]]
            except OSError as exc:
                raise ConfigError(f"{option} {path}: cannot read it ({exc.strerror or exc})") from None
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ConfigError(f"{option} {path}: expected the JSON of `smp-ros eval --json` (tasks -> "
                                  f"episodes with seed and success); {type(exc).__name__}: {exc}") from None
            for task, seed, success in records:
                key = (g, task, seed)
                if key in out:
                    raise ConfigError(f"{option} {path}: {task} seed {seed} appears twice for the same trained model; "
                                      f"give each evaluation once (or the second model as another {option})")
                out[key] = success
    return out


def compare(a: dict[Key, bool], b: dict[Key, bool]) -> dict:
    """The paired comparison of two outcome maps (see the module's text)."""
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ConfigError("--a and --b share no episode (same task and episode seed for the paired models)")

    def side(outcomes: dict[Key, bool], subset: list[Key]) -> dict:
        s = sum(outcomes[k] for k in subset)
        lo, hi = wilson_interval(s, len(subset))
        return {"successes": s, "success_rate": s / len(subset), "ci95": [lo, hi]}

    tasks = sorted({k[1] for k in keys})
    per_task = {}
    for task in tasks:
        subset = [k for k in keys if k[1] == task]
        per_task[task] = {"episodes": len(subset), "a": side(a, subset), "b": side(b, subset)}
    a_only = sum(a[k] and not b[k] for k in keys)
    b_only = sum(b[k] and not a[k] for k in keys)
    return {"episodes": len(keys), "tasks": per_task, "a": side(a, keys), "b": side(b, keys),
            "a_only": a_only, "b_only": b_only, "mcnemar_p": exact_mcnemar(a_only, b_only),
            "unpaired": {"a": len(set(a) - set(b)), "b": len(set(b) - set(a))}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--a", nargs="+", action="append", type=Path, required=True, metavar="EVAL_JSON",
                        help="result files of one trained model; repeat for each further training seed")
    parser.add_argument("--b", nargs="+", action="append", type=Path, required=True, metavar="EVAL_JSON",
                        help="the same for the other policy, paired with --a in order")
    parser.add_argument("--json", type=Path, default=None, help="also write the comparison here")


def run(args: argparse.Namespace) -> int:
    if len(args.a) != len(args.b):
        raise ConfigError(f"--a was given {len(args.a)} time(s) and --b {len(args.b)}: each trained model of one "
                          f"side is paired with one of the other")
    result = compare(load_outcomes(args.a, "--a"), load_outcomes(args.b, "--b"))
    result["a_files"] = [[str(p) for p in g] for g in args.a]
    result["b_files"] = [[str(p) for p in g] for g in args.b]

    def row(name: str, r: dict) -> dict:
        def cell(s: dict) -> str:
            return f"{s['successes']}  {s['success_rate']:.3f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]"
        return {"task": name, "n": r["episodes"], "a": cell(r["a"]), "b": cell(r["b"])}

    columns = [Column("task", "task", 14, left=True), Column("paired", "n", 7),
               Column("A: solved  rate [95% CI]", "a", 30), Column("B: solved  rate [95% CI]", "b", 30)]
    rows = [row(t, r) for t, r in result["tasks"].items()] + [row("all", result)]
    print(format_table(columns, rows))
    print(f"discordant pairs: A only {result['a_only']}, B only {result['b_only']}; "
          f"exact McNemar two-sided p = {result['mcnemar_p']:.3g}")
    if any(result["unpaired"].values()):
        print(f"left out (run by one side only): A {result['unpaired']['a']}, B {result['unpaired']['b']}")
    if args.json is not None:
        write_json(args.json, result)
    return 0
