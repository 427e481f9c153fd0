"""``smp-ros inspect BAG``: what a bag holds, and the ``data.topics`` overlay that trains on it.

For every topic: type, message count, rate and median period (receive times), the longest gap
(flagged when longer than ``data.max_gap_s``), header-stamp health, and for cameras the encodings /
formats and frame sizes; for joint states the joint names. Then a suggested YAML overlay for
``smp-ros train --config``: which topics feed which camera, arm and action, the action source, where
the task comes from and the joint names. The suggestion is a starting point from topic and joint
names; the report says what each choice is based on, so a user can check it in a minute.

Reads with rosbags (no ROS install); image payloads are only deserialised for a few sample frames.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import yaml
from rosbags.highlevel import AnyReader

from smp_ros.config import ARM_JOINTS, ARMS, CAMERAS, DataConfig, preset
from smp_ros import topics as default_topics
from smp_ros.data.bag_reader import _DEFAULT_TYPESTORE, COMPRESSED_TYPE, IMAGE_TYPE, JOINT_TYPE, STRING_TYPE
from smp_ros.data.errors import BagError

_SAMPLES = 5  # frames per camera deserialised to read encodings and sizes (first, last, evenly between)
_COMMAND_WORDS = ("cmd", "command", "ctrl", "control", "target", "action", "goal")
_LEADER_WORDS = ("leader", "master", "teleop")


def inspect_bag(bag: str | Path, max_gap_s: float | None = None) -> dict:
    """A JSON-ready report of the bag at ``bag``; see the module docstring."""
    bag = Path(bag)
    max_gap_s = DataConfig().max_gap_s if max_gap_s is None else max_gap_s
    try:
        reader = AnyReader([bag], default_typestore=_DEFAULT_TYPESTORE)
        reader.open()
    except Exception as exc:  # rosbags raises several types for bad metadata or storage
        raise BagError(bag, f"cannot open the bag ({type(exc).__name__}: {exc}); if it is an interrupted "
                       "recording, `smp-ros bag repair` rebuilds it") from None
    try:
        conns = {c.topic: c for c in reader.connections}
        times: dict[str, list[int]] = {t: [] for t in conns}
        for conn, receive_ns, _ in reader.messages():
            times[conn.topic].append(receive_ns)
        topics = []
        for topic, conn in sorted(conns.items()):
            topics.append(_topic_report(reader, conn, np.asarray(times[topic], dtype=np.int64), max_gap_s))
        meta = yaml.safe_load((bag / "metadata.yaml").read_text()).get("rosbag2_bagfile_information", {})
    except BagError:
        raise
    except Exception as exc:
        raise BagError(bag, f"unreadable while inspecting ({type(exc).__name__}: {exc}); "
                       "try `smp-ros bag repair` on it") from None
    finally:
        reader.close()
    all_ns = [t for ts in times.values() for t in ts]
    report = {
        "bag": str(bag), "storage": meta.get("storage_identifier"), "ros_distro": meta.get("ros_distro"),
        "files": list(meta.get("relative_file_paths") or []), "custom_data": meta.get("custom_data") or {},
        "message_count": len(all_ns),
        "duration_s": round((max(all_ns) - min(all_ns)) / 1e9, 3) if all_ns else 0.0,
        "max_gap_s": max_gap_s, "topics": topics,
    }
    report["suggestion"] = suggest_topics(report)
    return report


def _topic_report(reader, conn, stamps: np.ndarray, max_gap_s: float) -> dict:
    out: dict = {"topic": conn.topic, "type": conn.msgtype, "count": int(stamps.size)}
    if stamps.size >= 2:
        stamps = np.sort(stamps)
        periods = np.diff(stamps) / 1e9
        span = (stamps[-1] - stamps[0]) / 1e9
        out["rate_hz"] = round((stamps.size - 1) / span, 2) if span > 0 else None
        out["median_period_s"] = round(float(np.median(periods)), 5)
        worst = int(np.argmax(periods))
        out["longest_gap_s"] = round(float(periods[worst]), 3)
        out["longest_gap_at_s"] = round((stamps[worst] - stamps[0]) / 1e9, 3)  # seconds into the topic
        out["gaps_over_max"] = int(np.sum(periods > max_gap_s))
    if conn.msgtype in (IMAGE_TYPE, COMPRESSED_TYPE, JOINT_TYPE, STRING_TYPE) and stamps.size:
        picks = sorted({int(round(i)) for i in np.linspace(0, stamps.size - 1, min(_SAMPLES, stamps.size))})
        samples = []
        for i, (_, _, raw) in enumerate(reader.messages(connections=[conn])):
            if i in picks:
                samples.append(reader.deserialize(raw, conn.msgtype))
            if i >= picks[-1]:
                break
        if conn.msgtype == IMAGE_TYPE:
            out["encodings"] = sorted({str(m.encoding) for m in samples})
            out["sizes"] = sorted({f"{int(m.width)}x{int(m.height)}" for m in samples})
        elif conn.msgtype == COMPRESSED_TYPE:
            out["formats"] = sorted({str(m.format) for m in samples})
            sizes = set()
            import cv2
            for m in samples:
                img = cv2.imdecode(np.frombuffer(bytes(m.data), np.uint8), cv2.IMREAD_UNCHANGED)
                sizes.add("undecodable" if img is None else f"{img.shape[1]}x{img.shape[0]}")
            out["sizes"] = sorted(sizes)
        elif conn.msgtype == JOINT_TYPE:
            out["joint_names"] = [str(n) for n in samples[0].name]
            out["values_per_message"] = int(len(samples[0].position))
        elif conn.msgtype == STRING_TYPE:
            out["first_value"] = str(samples[0].data)[:80]
        if conn.msgtype != STRING_TYPE:
            zero = sum(1 for m in samples if int(m.header.stamp.sec) == 0 and int(m.header.stamp.nanosec) == 0)
            out["header_stamps"] = "zero (receive times will be used)" if zero == len(samples) else "set"
    return out


# -- the suggestion --------------------------------------------------------------------------------
def _words(text: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", text.lower())) - {""}


def _arm_of(topic: dict) -> str | None:
    """left / right from the topic name, else from the joint-name prefixes."""
    found = [a for a in ARMS if a in _words(topic["topic"]) or any(a in w for w in _words(topic["topic"]))]
    if len(found) == 1:
        return found[0]
    names = " ".join(topic.get("joint_names", []))
    found = [a for a in ARMS if a in names.lower()]
    return found[0] if len(found) == 1 else None


def _camera_name(topic: str, taken: set[str]) -> tuple[str, str]:
    """(camera name for data.topics.cameras, why). House names when the topic says which camera it is."""
    words = " ".join(_words(topic))
    if "wrist" in words or "hand" in words or "gripper" in words:
        for arm in ARMS:
            if arm in words and f"cam_{arm}_wrist" not in taken:
                return f"cam_{arm}_wrist", f"'wrist' and '{arm}' in the topic name"
    if "cam_high" not in taken and any(w in words for w in ("high", "top", "head", "overhead", "front", "scene")):
        return "cam_high", "a scene camera by its topic name"
    if "cam_high" not in taken:
        return "cam_high", "the first camera without a wrist/arm in its name"
    parts = [p for p in topic.strip("/").split("/") if p not in ("image_raw", "compressed", "image", "color", "rgb")]
    name = re.sub(r"[^a-z0-9_]+", "_", "_".join(parts[-2:]).lower()).strip("_") or "camera"
    return name, "named after the topic (not one of the model's cameras: map it by hand if needed)"


def suggest_topics(report: dict) -> dict:
    """{"overlay": {...data.topics...}, "why": [...], "unmapped": [...]} from an ``inspect_bag`` report."""
    why: list[str] = []
    topics = report["topics"]
    joint_topics = [t for t in topics if t["type"] == JOINT_TYPE and t["count"]]
    states: dict[str, dict] = {}
    actions: dict[str, dict] = {}
    action_kind = None
    for t in joint_topics:
        arm = _arm_of(t)
        words = _words(t["topic"])
        role = ("leader" if any(w in words for w in _LEADER_WORDS) else
                "command" if any(w in words for w in _COMMAND_WORDS) else "state")
        if arm is None:
            why.append(f"{t['topic']}: no 'left'/'right' in its name or joint names; not mapped")
            continue
        if role == "state":
            states.setdefault(arm, t)
        else:
            actions.setdefault(arm, t)
            action_kind = action_kind or role
    overlay: dict = {}
    if states:
        overlay["joint_states"] = {a: states[a]["topic"] for a in ARMS if a in states}
        why.append("joint_states: JointState topics without command/leader words, per arm by name")
    missing_arms = [a for a in ARMS if a not in states]
    if missing_arms:
        why.append(f"no joint-state topic found for arm(s) {missing_arms}: both arms are needed")
    if len(actions) == len(ARMS):
        overlay["action"] = {a: actions[a]["topic"] for a in ARMS}
        overlay["action_source"] = action_kind
        why.append(f"action: {action_kind} topics ({'/'.join(_COMMAND_WORDS if action_kind == 'command' else _LEADER_WORDS)}"
                   " in the name)")
    else:
        overlay["action_source"] = "next_state"
        why.append("no command or leader topic for both arms: the action is the follower's next state "
                   "(action_source: next_state)")
    sample = (states.get("left") or states.get("right") or {}).get("joint_names", [])
    if sample:
        bare = [re.sub(rf"^({'|'.join(ARMS)})_", "", n) for n in sample][: ARM_JOINTS + 1]
        if bare != [f"joint{i}" for i in range(1, ARM_JOINTS + 1)] + ["gripper"]:
            if len(bare) == ARM_JOINTS + 1:
                overlay["joint_names"] = bare
                why.append(f"joint_names: the first {ARM_JOINTS + 1} names of {states.get('left', states.get('right'))['topic']} "
                           "(6 joints then the gripper: check the order)")
            else:
                why.append(f"the joint-state messages name {len(sample)} joints; the model needs "
                           f"{ARM_JOINTS} + gripper per arm: set joint_names by hand")
    cams: dict[str, str] = {}
    for t in topics:
        if t["type"] in (IMAGE_TYPE, COMPRESSED_TYPE) and t["count"]:
            name, reason = _camera_name(t["topic"], set(cams))
            cams[name] = t["topic"]
            why.append(f"cameras.{name}: {t['topic']} ({reason})")
    if cams:
        overlay["cameras"] = cams
    strings = [t for t in topics if t["type"] == STRING_TYPE and t["count"]]
    if any(t["topic"] == default_topics.TASK for t in strings):
        why.append(f"task: {default_topics.TASK} (the default task topic)")
    elif strings:
        overlay["task_source"], overlay["task_topic"] = "topic", strings[0]["topic"]
        why.append(f"task: the String topic {strings[0]['topic']} (first value {strings[0].get('first_value')!r})")
    elif "smp_task" in (report.get("custom_data") or {}):
        overlay["task_source"] = "metadata"
        why.append("task: metadata.yaml custom_data smp_task")
    else:
        overlay["task_source"] = "cli"
        why.append("task: the bag names none; give it with `smp-ros train --task NAME`")
    used = {v for v in overlay.get("cameras", {}).values()} | set(overlay.get("joint_states", {}).values()) \
        | set(overlay.get("action", {}).values()) | {overlay.get("task_topic", default_topics.TASK)}
    unmapped = [t["topic"] for t in topics if t["topic"] not in used]
    return {"overlay": {"data": {"topics": overlay}}, "why": why, "unmapped": unmapped}


# -- text output -----------------------------------------------------------------------------------
def format_report(report: dict) -> str:
    lines = [f"{report['bag']}: {report['storage']} ({len(report['files'])} file(s)), "
             f"{report['message_count']} messages over {report['duration_s']:.2f} s, recorded by "
             f"{report['ros_distro']}"]
    if report["custom_data"]:
        lines.append(f"  custom_data: {report['custom_data']}")
    header = f"  {'topic':<38} {'type':<32} {'count':>6} {'rate Hz':>8} {'longest gap':>12}  details"
    lines += ["", header, "  " + "-" * (len(header) - 2)]
    for t in report["topics"]:
        rate = f"{t['rate_hz']:.1f}" if t.get("rate_hz") else "-"
        gap = f"{t['longest_gap_s']:.3f} s" if "longest_gap_s" in t else "-"
        if t.get("gaps_over_max"):
            gap += " !"
        details = []
        for key in ("encodings", "formats", "sizes"):
            if key in t:
                details.append(f"{key} {','.join(t[key])}")
        if "joint_names" in t:
            details.append(f"joints {','.join(t['joint_names'])}")
        if "first_value" in t:
            details.append(f"value {t['first_value']!r}")
        if t.get("header_stamps", "set") != "set":
            details.append("header stamps " + t["header_stamps"])
        lines.append(f"  {t['topic']:<38} {t['type']:<32} {t['count']:>6} {rate:>8} {gap:>12}  {'; '.join(details)}")
    flagged = [t for t in report["topics"] if t.get("gaps_over_max")]
    if flagged:
        lines.append("")
        lines += [f"  ! {t['topic']}: {t['gaps_over_max']} gap(s) longer than data.max_gap_s = {report['max_gap_s']} s; "
                  f"the longest, {t['longest_gap_s']} s, {t['longest_gap_at_s']} s into the topic. An episode with "
                  "such a gap inside its span is refused" for t in flagged]
    sug = report["suggestion"]
    lines += ["", "Suggested overlay (save as a YAML file, check it, then `smp-ros train --config FILE ...`):", ""]
    lines += ["  # " + w for w in sug["why"]]
    if sug["unmapped"]:
        lines.append("  # not used: " + ", ".join(sug["unmapped"]))
    mapped = set(sug["overlay"]["data"]["topics"].get("cameras", {}))
    for name in ("sim", "paper"):
        need = preset(name).model.encoder.cameras
        if not set(need) <= mapped:
            lines.append(f"  # the {name!r} preset's model reads cameras {list(need)}; this overlay maps "
                         f"{sorted(mapped)}: rename them, or train a new model with model.encoder.cameras set")
    if mapped - set(CAMERAS):
        lines.append(f"  # camera names the presets know: {list(CAMERAS)}")
    lines += ["  " + line for line in yaml.safe_dump(sug["overlay"], sort_keys=False).splitlines()]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bags", nargs="+", type=Path, metavar="BAG", help="bag directories")
    parser.add_argument("--max-gap", type=float, default=None, metavar="S",
                        help=f"flag gaps longer than this (default data.max_gap_s = {DataConfig().max_gap_s} s)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--overlay", type=Path, default=None, metavar="FILE",
                        help="write the suggested data.topics overlay (of the first bag) to FILE")


def run(args: argparse.Namespace) -> int:
    reports = []
    status = 0
    for bag in args.bags:
        try:
            report = inspect_bag(bag, args.max_gap)
        except BagError as exc:
            print(f"smp-ros inspect: {exc}", file=sys.stderr)
            status = 2
            continue
        reports.append(report)
        print(format_report(report))
        print()
    if args.json is not None:
        args.json.write_text(json.dumps(reports if len(reports) != 1 else reports[0], indent=1))
    if args.overlay is not None and reports:
        args.overlay.write_text("# suggested by smp-ros inspect " + str(reports[0]["bag"]) + "\n"
                                + "".join(f"# {w}\n" for w in reports[0]["suggestion"]["why"])
                                + yaml.safe_dump(reports[0]["suggestion"]["overlay"], sort_keys=False))
    return status
