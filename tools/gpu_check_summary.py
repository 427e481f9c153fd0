"""Summary of a tools/gpu_check.sh run: every step's status and time, and its headline figures, as
OUT/summary.md and OUT/summary.json. Standard library only; a missing or partial file is reported,
never fatal.

    python tools/gpu_check_summary.py OUT
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

# Targets of the GPU work (H200, paper preset, batch 1, 10 DDIM steps, the router's own selection).
TARGET_P99_MS = 5.0
TARGET_PROPORTIONAL = 0.20  # denoising time proportional to |S| within 20 %
TARGET_SMP_OVER_DENSE = 0.5  # SMP at avg |S| = 2.3 over the dense DP of equal N_p


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit(path: Path) -> dict[str, Any] | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {**counts, "failed_tests": failed}


def verbose_log(path: Path) -> dict[str, Any]:
    """Counts from a ``pytest -v`` log, for a run stopped before it wrote its JUnit XML."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    def count(word: str) -> int:
        return sum(1 for line in lines if line.startswith("test/") and f" {word}" in line)
    failed = [line.split(" ")[0] for line in lines if line.startswith("test/") and (" FAILED" in line or " ERROR" in line)]
    return {"passed": count("PASSED"), "failures": count("FAILED"), "errors": count("ERROR"),
            "skipped": count("SKIPPED"), "failed_tests": failed, "partial": True}


def proportionality(sweep: dict[str, Any]) -> dict[str, float] | None:
    """Denoising p50 per |S| against the line through the origin that fits it best (least squares):
    the largest relative deviation; 0 = exactly proportional."""
    try:
        pts = sorted((int(n), v["denoise"]["p50"]) for n, v in sweep.items())
    except (KeyError, TypeError, ValueError):
        return None
    if len(pts) < 2:
        return None
    slope = sum(n * d for n, d in pts) / sum(n * n for n, _ in pts)
    dev = max(abs(d / (slope * n) - 1) for n, d in pts)
    return {"ms_per_expert": slope, "max_relative_deviation": dev, "sizes": len(pts)}


def bench_headline(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"preset": report.get("preset"), "device": (report.get("machine") or {}).get("device"),
                           "backend": report.get("backend"), "backend_reason": report.get("backend_reason"),
                           "complete": report.get("complete", True), "engine_warmup_s": report.get("engine_warmup_s"),
                           "gpu": (report.get("machine") or {}).get("gpu")}
    smp = report.get("smp") or {}
    total = (smp.get("stages_ms") or {}).get("total")
    if total:
        # The end-to-end figure is the host's wall clock per call where the bench recorded it (what a
        # caller waits); "total" sums the stages, which on CUDA are timed on the GPU.
        e2e = (smp.get("stages_ms") or {}).get("wall") or total
        out.update(own_p50_ms=e2e["p50"], own_p99_ms=e2e["p99"], mean_active=smp.get("mean_active"),
                   stage_sum_p99_ms=total["p99"])
        out["stages_p50_ms"] = {k: v["p50"] for k, v in smp["stages_ms"].items()}
    if report.get("sweep"):
        out["denoise_p50_ms_by_S"] = {n: v["denoise"]["p50"] for n, v in report["sweep"].items()}
        out["total_p99_ms_by_S"] = {n: v.get("wall", v["total"])["p99"] for n, v in report["sweep"].items()}
        out["proportionality"] = proportionality(report["sweep"])
    if "ratio_smp_avg_active_over_dense" in report:
        q = report["ratio_smp_avg_active_over_dense"]
        out["smp_over_dense"] = {"total": q["total"], "denoise": q["denoise"]}
        out["dense_total_p50_ms"] = report["dense"]["stages_ms"]["total"]["p50"]
    return out


def headline(step: str, out: Path) -> dict[str, Any]:
    if step == "env":
        env = _load(out / "env.json") or {}
        return {k: env.get(k) for k in ("python", "torch", "cuda", "cudnn", "gpu", "render", "missing")} | {
            "torch_tensorrt": (env.get("modules") or {}).get("torch_tensorrt")}
    if step in ("pytest_gpu", "cpu_tests"):
        return junit(out / f"{step}.xml") or verbose_log(out / f"{step}.log")
    if step.startswith("bench_"):
        report = _load(out / f"{step}.json")
        return bench_headline(report) if report else {}
    if step == "train_bench":
        report = _load(out / "train_bench.json") or {}
        return {"runs": [{k: r.get(k) for k in ("preset", "precision", "batch_size", "segment_length", "step_ms",
                                                "segments_per_s", "control_steps_per_s", "peak_memory_GiB",
                                                "finite", "error") if k in r} for r in report.get("runs", [])]}
    if step == "e2e":
        d = out / "e2e"
        phases = []
        try:
            phases = [json.loads(line) for line in (d / "phases.jsonl").read_text().splitlines() if line]
        except (OSError, ValueError):
            pass
        summary = _load(d / "model" / "training_summary.json") or {}
        evals = {p.stem[5:]: (_load(p) or {}).get("success_rate") for p in sorted(d.glob("eval_*.json"))}
        return {"phases": phases, "train_steps": summary.get("steps"),
                "final_loss": (summary.get("final_train") or {}).get("loss"),
                "episodes": (summary.get("data") or {}).get("episodes"), "eval_success": evals}
    return {}


def _fmt(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def brief(step: str, h: dict[str, Any]) -> str:
    """One line of headline figures for the markdown table."""
    if not h:
        return ""
    if step == "env":
        gpu = h.get("gpu") or {}
        return (f"{gpu.get('name', 'no GPU')}, torch {h.get('torch')}, CUDA {h.get('cuda')}, cuDNN {h.get('cudnn')}; "
                f"render {str(h.get('render'))[:40]}; missing {h.get('missing')}")
    if step in ("pytest_gpu", "cpu_tests"):
        text = f"{h.get('passed')} passed, {h.get('failures', 0) + h.get('errors', 0)} failed, {h.get('skipped')} skipped"
        if h.get("partial"):
            text += " (from the log: stopped before the end)"
        return text + (f" ({', '.join(h['failed_tests'][:4])})" if h.get("failed_tests") else "")
    if step.startswith("bench_"):
        parts = [f"backend {h.get('backend')}"]
        if "own_p50_ms" in h:
            parts.append(f"own selection p50/p99 {_fmt(h['own_p50_ms'])}/{_fmt(h['own_p99_ms'])} ms "
                         f"(mean |S| {_fmt(h.get('mean_active'))})")
        if h.get("proportionality"):
            p = h["proportionality"]
            parts.append(f"denoise {_fmt(p['ms_per_expert'], 3)} ms x |S| (max dev {_fmt(100 * p['max_relative_deviation'], 0)} %)")
        if "smp_over_dense" in h:
            parts.append(f"SMP/dense {_fmt(h['smp_over_dense']['total'])} (denoise {_fmt(h['smp_over_dense']['denoise'])})")
        if not h.get("complete", True):
            parts.append("INCOMPLETE")
        parts.append(f"warmup {_fmt(h.get('engine_warmup_s'), 0)} s")
        return "; ".join(parts)
    if step == "train_bench":
        return "; ".join(f"{r.get('preset')} {r.get('precision')}: " + (
            f"{_fmt(r.get('segments_per_s'), 0)} seg/s ({_fmt(r.get('step_ms'), 1)} ms/step)" if "error" not in r
            else str(r["error"])[:40]) for r in h.get("runs", []))
    if step == "e2e":
        phases = ", ".join(f"{p['phase']} {p['seconds']} s" for p in h.get("phases", []))
        return f"{phases}; {h.get('episodes')} episodes, loss {_fmt(h.get('final_loss'))}, success {h.get('eval_success')}"
    return ""


def targets(steps: dict[str, dict[str, Any]]) -> list[str]:
    """The paper-preset targets, from the best backend that completed."""
    rows = []
    benches = {name: s["headline"] for name, s in steps.items() if name.startswith("bench_paper")
               and s["headline"].get("own_p99_ms") is not None}
    if not benches:
        return ["no paper-preset bench completed: no target can be checked"]
    best_name, best = min(benches.items(), key=lambda kv: kv[1]["own_p99_ms"])
    if best.get("preset") != "paper" or not str(best.get("device", "")).startswith("cuda"):
        rows.append(f"(these runs used the {best.get('preset')} preset on {best.get('device')}, not the targets' "
                    "conditions: the verdicts below only exercise the summary)")
    p99 = best["own_p99_ms"]
    rows.append(f"end-to-end p99 <= {TARGET_P99_MS} ms: {_fmt(p99)} ms with {best['backend']} ({best_name}) -> "
                f"{'met' if p99 <= TARGET_P99_MS else 'NOT met'}")
    for name, h in benches.items():
        p = h.get("proportionality")
        if p:
            rows.append(f"denoising proportional to |S| within {int(TARGET_PROPORTIONAL * 100)} % ({name}): max deviation "
                        f"{_fmt(100 * p['max_relative_deviation'], 1)} % -> "
                        f"{'met' if p['max_relative_deviation'] <= TARGET_PROPORTIONAL else 'NOT met'}")
        q = h.get("smp_over_dense")
        if q:
            rows.append(f"SMP (|S| = 2.3) / dense DP <= {TARGET_SMP_OVER_DENSE} ({name}): {_fmt(q['total'])} end to end, "
                        f"{_fmt(q['denoise'])} denoising -> {'met' if q['total'] <= TARGET_SMP_OVER_DENSE else 'NOT met'}")
    return rows


def main(out_dir: str) -> int:
    out = Path(out_dir)
    steps: dict[str, dict[str, Any]] = {}
    for path in sorted((out / "status").glob("*.json"), key=lambda p: p.stat().st_mtime):
        status = _load(path)
        if not status:
            continue
        name = status["step"]
        try:
            h = headline(name, out) if status["status"] != "skipped" else {}
        except Exception as exc:  # noqa: BLE001 - a malformed result must not lose the rest of the summary
            h = {"summary_error": f"{type(exc).__name__}: {exc}"}
        steps[name] = {**status, "headline": h}
    result = {"out": str(out), "steps": steps, "targets": targets(steps)}
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    lines = ["# GPU check summary", "", "| step | status | seconds (limit) | headline |", "|---|---|---|---|"]
    for name, s in steps.items():
        text = s["headline"].get("summary_error") or brief(name, s["headline"])
        lines.append(f"| {name} | {s['status']} | {s['seconds']} ({s['limit_s']}) | {text.replace('|', chr(92) + '|')} |")
    lines += ["", "## Targets (paper preset, batch 1, 10 DDIM steps)", ""] + [f"- {t}" for t in result["targets"]]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu_check"))
