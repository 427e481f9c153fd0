"""`smp-ros bench` end to end on the tiny preset (structure of the report, never its timings)."""

import argparse
import json

import pytest

from smp_ros.config import preset
from smp_ros.model.policy import build_policy
from smp_ros.runtime import bench


@pytest.mark.parametrize("name", ["tiny", "sim"])
def test_dense_baseline_is_sized_to_the_same_total_parameters(name):
    cfg = preset(name).model
    dense_cfg, dense_np, smp_np = bench.dense_matching(cfg)
    counted = {n: sum(p.numel() for p in build_policy(c).parameters()) for n, c in (("smp", cfg), ("dense", dense_cfg))}
    assert counted["smp"] == smp_np and counted["dense"] == dense_np
    assert dense_cfg.policy == "dense_dp"
    assert abs(dense_np - smp_np) / smp_np < 0.1


def test_bench_writes_every_section(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--preset", "tiny", "--backend", "eager", "--threads", "1", "--warmup", "0",
                              "--iters", "2", "--json", str(out)])
    assert bench.run(args) == 0
    report = json.loads(out.read_text())
    K = preset("tiny").model.num_experts
    assert report["random_weights"] and report["backend"] == "eager" and report["complete"]
    assert "wall" in report["smp"]["stages_ms"]  # the host clock around each call, beside the stage sum
    assert set(report["sweep"]) == {str(n) for n in range(1, K + 1)}
    for stages in (report["smp"]["stages_ms"], report["dense"]["stages_ms"], report["sweep"]["2"]):
        assert stages["total"]["p50"] > 0 and stages["total"]["p99"] >= stages["total"]["p50"]
    assert report["denoise_ratio_K_over_2"]["proportional"] == K / 2
    assert report["ratio_smp_avg_active_over_dense"]["avg_active"] == 2.3
    assert report["machine"]["cpu_cores_usable"] >= 1 and report["machine"]["torch"]
    printed = capsys.readouterr().out
    assert "paper-style table" in printed and "random weights" in printed
