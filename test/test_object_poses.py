"""The object-pose track: the message layout, the model's pose vector, bag -> cache round trip, the
sim_state preset training and running closed loop on the poses, and the experiment runner."""

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from rosbags.highlevel import AnyReader

from smp_ros.config import OBJECT_SLOTS, TASK_OBJECTS, SimConfig, preset
from smp_ros.model.objects import OBJECT_POSES_MSG, object_vector

world_mod = pytest.importorskip("smp_ros.sim.world")
from smp_ros.sim import demos  # noqa: E402
from smp_ros.data.bag_format import TYPESTORE  # noqa: E402

pytestmark = pytest.mark.sim
ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def test_message_definition_matches_the_msg_file():
    lines = [line.split("#")[0].strip() for line in (ROOT / "msg" / "ObjectPoses.msg").read_text().splitlines()]
    fields = [" ".join(line.split()) for line in lines if line]
    assert fields == OBJECT_POSES_MSG.strip().splitlines()


def test_object_vector_orders_pads_and_fixes_the_quaternion_sign():
    table = {"t": ("a", "b")}
    poses = np.array([[1, 2, 3, 0, 0, 0, -1.0],  # b: q = -identity, same rotation as identity
                      [4, 5, 6, 0, 0, np.sin(0.3), np.cos(0.3)],  # a
                      [9, 9, 9, 0, 0, 0, 1.0]])  # an extra object the task does not track
    v = object_vector("t", ["b", "a", "extra"], poses, table, slots=3).reshape(3, 7)
    np.testing.assert_allclose(v[0], [4, 5, 6, 0, 0, np.sin(0.3), np.cos(0.3)], atol=1e-6)
    np.testing.assert_allclose(v[1], [1, 2, 3, 0, 0, 0, 1.0])
    np.testing.assert_array_equal(v[2], 0.0)  # padding
    with pytest.raises(ValueError, match="object 'a' of task 't' is missing.*data.task_objects"):
        object_vector("t", ["b"], poses[:1], table, slots=3, where="bag x")
    with pytest.raises(ValueError, match="more than the 1 slots"):
        object_vector("t", ["a", "b"], poses[:2], table, slots=1)


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    """Two short state-only handover demonstrations (one tracked object, two padded slots)."""
    out = tmp_path_factory.mktemp("state_demos")
    cfg = replace(SimConfig(), episode_steps=STEPS)
    with world_mod.BimanualWorld(cfg, "handover", seed=3) as world:
        for seed in (3, 4):
            demos.record_episode(world, seed, out / f"handover_{seed:04d}", backend="direct", render=False)
    return out


def test_bag_to_cache_round_trip(bags, tmp_path):
    from smp_ros.data.cache import prepare_cache
    from smp_ros.train.trainer import data_config_for

    cfg = preset("sim_state")
    data_cfg = data_config_for(cfg)
    assert data_cfg.object_slots == OBJECT_SLOTS and data_cfg.topics.cameras == {}
    cache = prepare_cache([bags], data_cfg, cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert cache.objects is not None and cache.objects.shape == (cache.num_steps, OBJECT_SLOTS * 7)
    assert len(cache.stats["objects"]["min"]) == OBJECT_SLOTS * 7
    ep = cache.episodes[0]
    with AnyReader([Path(ep.bag)], default_typestore=TYPESTORE) as reader:
        conns = [c for c in reader.connections if c.topic == "/smp/object_poses"]
        msgs = [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages(connections=conns)]
    assert len(msgs) == STEPS and ep.length == STEPS
    for k, m in enumerate(msgs):  # poses come at the control rate, so grid step k holds message k
        p = m.poses[list(m.names).index(TASK_OBJECTS["handover"][0])]
        q = np.array([p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w])
        q = q if q[3] >= 0 else -q
        expected = np.concatenate([[p.position.x, p.position.y, p.position.z], q, np.zeros(14)])
        np.testing.assert_allclose(cache.objects[ep.start + k], expected, atol=1e-6)


def test_sim_state_preset_trains_and_runs_closed_loop_on_poses(bags, tmp_path):
    from smp_ros.sim.evaluate import evaluate
    from smp_ros.train.trainer import TrainRequest, load_config, train

    cfg = load_config("sim_state", steps=3)
    assert cfg.model.encoder.mode == "lowdim" and cfg.model.encoder.object_slots == OBJECT_SLOTS
    seen = []
    result = train(cfg, TrainRequest(data=[str(bags)], out=tmp_path / "m", device="cpu", progress=False,
                                     cache_dir=tmp_path / "cache", on_log=lambda s, t: seen.append(t)))
    assert result.steps == 3 and all(np.isfinite(t["loss"]) for t in seen)
    val = [json.loads(line) for line in (tmp_path / "m.train" / "val.jsonl").read_text().splitlines()]
    gates = val[-1]["gates"]
    assert {"gate_entropy", "mean_active", "flip_rate", "phase_nmi"} <= set(gates)
    assert 0 <= gates["gate_entropy"] <= np.log(cfg.model.num_experts) + 1e-6
    report = evaluate(str(tmp_path / "m"), ("handover",), 1, seed=500,
                      cfg=replace(SimConfig(), episode_steps=12), backend="direct", render=False)
    ep = report["tasks"]["handover"]["episodes"][0]
    plan_every = round(cfg.data.control_rate_hz / cfg.runtime.policy_rate_hz)  # control steps per new chunk
    assert ep["steps"] == 12 and ep["inferences"] == -(-12 // plan_every) >= 3
    assert 1 <= ep["mean_active"] <= cfg.model.selection.k


def test_closed_loop_refuses_observations_without_the_tracked_objects(bags, tmp_path):
    from smp_ros.runtime.closed_loop import LearnedPolicy
    from smp_ros.runtime.observation import Observation
    from smp_ros.train.trainer import TrainRequest, load_config, train

    train(load_config("sim_state", steps=1), TrainRequest(data=[str(bags)], out=tmp_path / "m", device="cpu",
                                                          progress=False, cache_dir=tmp_path / "c",
                                                          diagnostics=False))
    from smp_ros.config import RuntimeConfig
    policy = LearnedPolicy.from_model_dir(tmp_path / "m", RuntimeConfig(backend="eager", task="handover"))
    policy.reset("handover")
    with pytest.raises(ValueError, match="object 'tool' of task 'handover' is missing"):
        policy.act(Observation(time=0.0, qpos=np.zeros(14), task="handover", objects={}))


def test_experiment_runner_end_to_end_and_resume(bags, tmp_path):
    from smp_ros.experiment import ExperimentSpec, method_config, run_experiment
    from smp_ros.results import wilson_interval
    from smp_ros.train.trainer import TrainRequest, load_config, train

    # Independent check of the interval: 0 of 10 -> [0, 0.278]; 5 of 10 -> [0.237, 0.763] (tabulated).
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-3)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-3)

    from smp_ros.experiment import resolve
    assert resolve("tau0.9") == ("smp", {}, {"model.selection.tau_m": 0.9, "model.selection.k": None})
    assert resolve("top2")[2] == {"model.selection.mode": "topk", "model.selection.k": 2}
    with pytest.raises(ValueError, match="unknown 'bogus'"):
        resolve("bogus")
    assert resolve("tau0.99_hold") == ("smp", {}, {"model.selection.tau_m": 0.99, "model.selection.k": None,
                                                   "model.selection.inactive": "hold"})
    assert resolve("no_sticky_hold")[:2] == ("no_sticky", {"model.gate.sticky": False})
    with pytest.raises(ValueError, match="no experts to hold"):
        resolve("dp_hold")
    with pytest.raises(ValueError, match="unknown '_hold'"):
        resolve("_hold")

    work = tmp_path / "work"
    spec = ExperimentSpec(data=[str(bags)], workdir=work, out=tmp_path / "report.json",
                          methods=["smp", "dp", "topk"], seeds=[0], episodes=1, eval_seed=900,
                          tasks=("handover",), steps=4, episode_steps=4, progress=False)
    with pytest.raises(ValueError, match="seeds of training demonstrations"):
        run_experiment(replace(spec, eval_seed=3))
    # A run that was killed after 2 of the dense baseline's 4 steps: its state is there, its model not.
    dp_cfg = method_config(load_config("sim_state", steps=4), "dp", 0)
    train(dp_cfg, TrainRequest(data=[str(bags)], out=work / "models" / "dp_s0", device="cpu", progress=False,
                               cache_dir=work / "cache", stop_after=2))
    report = run_experiment(spec)
    summary = json.loads((work / "models" / "dp_s0" / "training_summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == 4
    assert set(report["methods"]) == {"smp", "dp", "topk"}
    for method, r in report["methods"].items():
        o = r["overall"]
        assert o["episodes"] == 1 and 0 <= o["success_ci95"][0] <= o["success_rate"] <= o["success_ci95"][1] <= 1
        assert 0 <= o["mean_progress"] <= 1 and "success" not in o and "progress" not in o  # smp_ros.results
        assert o["parameters"]["active"] <= o["parameters"]["total"]
    assert report["methods"]["topk"]["overall"]["mean_active"] == 4.0  # k = 4 experts, always
    assert report["methods"]["dp"]["overall"]["mean_active"] == 1.0

    # Resume: nothing is retrained; only the evaluation that is missing runs again.
    evals = {p.name: p.stat().st_mtime_ns for p in (work / "eval").iterdir()}
    models = {p.name: (p / "model.safetensors").stat().st_mtime_ns for p in (work / "models").iterdir()
              if p.is_dir() and not p.name.endswith(".train")}
    os.remove(work / "eval" / "topk_s0_handover.json")
    again = run_experiment(spec)
    assert {p.name: (p / "model.safetensors").stat().st_mtime_ns for p in (work / "models").iterdir()
            if p.is_dir() and not p.name.endswith(".train")} == models
    for name, mtime in evals.items():
        now = (work / "eval" / name).stat().st_mtime_ns
        assert (now != mtime) == (name == "topk_s0_handover.json"), name
    assert again["methods"]["topk"]["overall"]["episodes"] == 1
