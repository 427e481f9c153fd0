"""tools/train_sim.sh (`make train-sim`): the shipped model's recipe, printed with DRY_RUN=1 (nothing is run)."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dry_run(tmp_path, demos, dart):
    env = {**os.environ, "DRY_RUN": "1", "DEMOS": str(demos), "DART": str(dart), "SMP": "smp-ros"}
    done = subprocess.run(["bash", str(ROOT / "tools" / "train_sim.sh")], env=env, capture_output=True, text=True,
                          check=True, cwd=tmp_path)
    return done.stdout.splitlines()


def test_recipe_records_what_is_missing_then_trains_on_both_sets(tmp_path):
    demos, dart = tmp_path / "demos", tmp_path / "dart"
    demos.mkdir()
    for task, n in (("pen_cap", 100), ("cups_in_bowl", 100), ("handover", 100), ("pour_beans", 104)):
        (demos / f".recorded_{task}_{n}").touch()
    (dart / "handover").mkdir(parents=True)
    (dart / "handover" / ".recorded_handover_60").touch()
    lines = dry_run(tmp_path, demos, dart)
    recorded = [line for line in lines if " sim-demos " in line]
    # Only the DART sets not marked as recorded, each into its own folder, with the noise.
    assert [line.split("--task ")[1].split()[0] for line in recorded] == ["pen_cap", "cups_in_bowl", "pour_beans"]
    for line in recorded:
        task = line.split("--task ")[1].split()[0]
        assert f"--out {dart}/{task} --seed 5000 --action-noise 0.03" in line and "--episodes 60" in line
    assert f"+ rm -rf {dart}/pour_beans/pour_beans_*" in lines  # an interrupted set is recorded afresh
    assert not any(f"rm -rf {demos}" in line for line in lines)  # the recorded plain sets are left alone
    (train,) = [line for line in lines if " train " in line]
    folders = f"{demos} {dart}/pen_cap {dart}/cups_in_bowl {dart}/handover {dart}/pour_beans"
    assert f"--data {folders} --preset sim --config config/train_sim.yaml" in train


def test_plain_sets_are_recorded_without_noise(tmp_path):
    lines = dry_run(tmp_path, tmp_path / "demos", tmp_path / "dart")
    plain = [line for line in lines if " sim-demos " in line and f"--out {tmp_path / 'demos'} " in line]
    assert len(plain) == 4 and all(line.endswith("--action-noise 0") for line in plain)
    assert "--seed 4000" in plain[3] and "--episodes 104" in plain[3]
