"""MuJoCo twin: kinematics against piper_sdk, rendering, task checks, scripted experts."""

import numpy as np
import pytest
from piper_sdk.kinematics.piper_fk import C_PiperForwardKinematics

from smp_ros.config import SimConfig, TASKS
from smp_ros.sim import kinematics as K

world_mod = pytest.importorskip("smp_ros.sim.world")
from smp_ros.sim.evaluate import run_episode  # noqa: E402
from smp_ros.sim.scripted import ScriptedExpert  # noqa: E402
from waiting import wait_for  # noqa: E402


def test_mjcf_flange_matches_sdk_forward_kinematics():
    sdk = C_PiperForwardKinematics(0x01)
    rng = np.random.default_rng(3)
    with world_mod.BimanualWorld(SimConfig(), "handover", seed=0) as world:
        import mujoco
        for _ in range(40):
            side = ("left", "right")[rng.integers(2)]
            q = rng.uniform(K.JOINT_LOWER, K.JOINT_UPPER)
            world.data.qpos[world.arms[side]._qadr] = q
            mujoco.mj_kinematics(world.model, world.data)
            p_sim = world.data.body(f"{side}_flange").xpos - world.arms[side].base_pose[:3, 3]
            p_sdk = np.array(sdk.CalFK(list(q))[-1][:3]) / 1000.0
            assert np.abs(p_sim - p_sdk).max() < 1e-3


def test_end_pose_matches_sdk_forward_kinematics_to_the_protocol_resolution():
    sdk = C_PiperForwardKinematics(0x01)
    rng = np.random.default_rng(5)
    qs = [rng.uniform(K.JOINT_LOWER, K.JOINT_UPPER) for _ in range(300)]
    qs += [np.array([0.3, 1.0, -1.2, 0.0, q5, 0.4]) for q5 in (-1.2, 0.0, 1.2)]
    for q in qs:
        expected = np.array(sdk.CalFK(q.tolist())[-1])
        got = np.array(K.end_pose(q.tolist()))
        assert np.abs(got[:3] - expected[:3]).max() < 1e-6  # mm
        turn = np.abs(got[3:] - expected[3:])
        assert np.minimum(turn, 360.0 - turn).max() < 1e-6  # deg


def test_inverse_kinematics_reaches_random_reachable_poses():
    rng = np.random.default_rng(0)
    for _ in range(20):
        q_true = rng.uniform(K.JOINT_LOWER * 0.8, K.JOINT_UPPER * 0.8)
        target = K.forward(q_true, 0.1)
        q = K.inverse(target, q_true + rng.normal(0, 0.1, 6), 0.1, iterations=200)
        assert np.abs(K.forward(q, 0.1)[:3, 3] - target[:3, 3]).max() < 1e-3


@pytest.mark.sim
def test_every_camera_renders_a_nontrivial_image():
    with world_mod.BimanualWorld(SimConfig(), "cups_in_bowl", seed=1) as world:
        for cam in world.cfg.cameras:
            img = world.render(cam)
            assert img.shape == (128, 128, 3) and img.dtype == np.uint8
            assert img.std() > 5.0 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50
        with pytest.raises(ValueError, match="unknown camera"):
            world.render("cam_nowhere")


@pytest.mark.parametrize("task", TASKS)
def test_reset_randomises_object_poses(task):
    with world_mod.BimanualWorld(SimConfig(), task, seed=0) as world:
        first = world.task_state()
        world.reset(1)
        second = world.task_state()
        world.reset(0)
        again = world.task_state()
    body = world.task.bodies[0]
    assert not np.allclose(first[body]["pos"], second[body]["pos"])
    np.testing.assert_allclose(first[body]["pos"], again[body]["pos"], atol=1e-9)


def test_cups_success_check_on_hand_placed_states():
    with world_mod.BimanualWorld(SimConfig(), "cups_in_bowl", seed=0) as world:
        task = world.task
        bowl = task.pos(world, "bowl")
        assert not world.success() and world.stage() == 0
        task.set_pose(world, "cup_left", bowl + [0.0, 0.03, 0.025])
        task.set_pose(world, "cup_right", bowl + [0.0, 0.2, 0.02])  # beside the bowl: not in it
        world.step(0.3)  # let them settle
        assert task.in_bowl(world, "cup_left") is True
        assert task.in_bowl(world, "cup_right") is False


def test_bad_setpoints_are_refused_with_the_joint_named():
    with world_mod.BimanualWorld(SimConfig(), "pen_cap", seed=0) as world:
        with pytest.raises(ValueError, match="left_joint2"):
            world.arms["left"].set_joint_targets([0, np.nan, 0, 0, 0, 0])
        with pytest.raises(ValueError, match="right_joint3"):
            world.arms["right"].set_joint_targets([0, 1.0, 0.5, 0, 0, 0])
        with pytest.raises(ValueError, match="right_gripper"):
            world.arms["right"].set_gripper_target(0.2)


def test_a_diverged_simulation_raises_naming_the_joint_and_a_reset_recovers():
    """MuJoCo resets its own state when it meets a NaN/huge velocity or acceleration (its warning
    mechanism); the world must say so instead of carrying on from the reset state."""
    with world_mod.BimanualWorld(SimConfig(), "pen_cap", seed=0) as world:
        world.step(0.05)
        world.data.qvel[world.model.joint("left_joint2").dofadr[0]] = np.nan
        with pytest.raises(world_mod.SimulationUnstable, match="left_joint2.*pen_cap"):
            world.step(0.05)
        world.reset(1)
        world.step(0.2)  # a fresh episode steps normally
        assert world.time > 0.19


def test_an_unstable_episode_ends_failed_and_the_next_one_runs():
    def diverge(k, obs, action, sent, arms):
        if k == 5:
            world.data.qvel[:] = np.nan

    with world_mod.BimanualWorld(SimConfig(), "handover", seed=0) as world:
        bad = run_episode(world, ScriptedExpert(world), seed=11, backend="direct", render=False, on_step=diverge)
        assert not bad.success and "simulation unstable" in bad.error and bad.steps == 6
        good = run_episode(world, ScriptedExpert(world), seed=11, backend="direct", render=False)
        assert good.success and good.error == ""


@pytest.mark.parametrize("task", TASKS)
def test_scripted_expert_succeeds_direct(task):
    with world_mod.BimanualWorld(SimConfig(), task, seed=0) as world:
        result = run_episode(world, ScriptedExpert(world), seed=11, backend="direct", render=False)
    assert result.success and result.progress == 1.0
    assert result.phases[0].startswith("left_") and result.phases[-1] == "done"


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_scripted_expert_success_rate_over_50_seeds(task):
    with world_mod.BimanualWorld(SimConfig(), task, seed=0) as world:
        wins = sum(run_episode(world, ScriptedExpert(world), seed=s, backend="direct", render=False).success
                   for s in range(50))
    assert wins >= 45


@pytest.mark.sim
def test_render_frames_writes_one_png_per_camera(tmp_path):
    import cv2
    from smp_ros.sim.render_frames import main
    assert main(["--out", str(tmp_path / "img"), "--task", "pen_cap", "--seed", "2"]) == 0
    with world_mod.BimanualWorld(SimConfig(), "pen_cap", seed=2) as world:
        for cam in world.cfg.cameras:
            png = cv2.cvtColor(cv2.imread(str(tmp_path / "img" / f"{cam}.png")), cv2.COLOR_BGR2RGB)
            np.testing.assert_array_equal(png, world.render(cam))  # PNG is lossless


def test_a_closed_world_with_its_can_rig_is_freed_without_the_cyclic_collector():
    """Every episode rebuilds the world: its MjModel and MjData (native memory the cyclic garbage
    collector does not count) must be freed as soon as the last reference goes, not whenever a full
    collection happens to run (a long simulator run grew ~1.4 MiB/min that way)."""
    import gc
    import uuid
    import weakref

    from smp_ros.sim.piper_rig import PiperRig

    tag = uuid.uuid4().hex[:8]
    rig = PiperRig({"left": f"free-left-{tag}", "right": f"free-right-{tag}"})
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for seed in (1, 2):
            world = world_mod.BimanualWorld(SimConfig(), "pen_cap", seed)
            rig.attach(world)
            world.step(0.01)
            ref = weakref.ref(world)
            rig.detach()
            world.close()
            del world
            assert ref() is None, "the world outlived its last reference (a reference cycle)"
    finally:
        if was_enabled:
            gc.enable()


def test_piper_episodes_in_one_process_leave_no_sdk_threads_behind():
    """piper_sdk keeps every channel's interface, with two polling threads, for the life of the
    process; the harness opens fresh channel names each episode and releases them at its end, so the
    thread count stays put (it grew by four threads per episode before)."""
    import threading

    class Stop(Exception):
        pass

    def stop_early(k, obs, action, sent, arms):
        if k == 2:
            raise Stop

    counts = []
    with world_mod.BimanualWorld(SimConfig(), "handover", seed=0) as world:
        for seed in range(4):
            with pytest.raises(Stop):
                run_episode(world, ScriptedExpert(world), seed=seed, backend="piper", render=False, on_step=stop_early)
            counts.append(threading.active_count())
    # A released channel's threads end on their own schedule (later on a busy machine): wait for them.
    # A leak (four threads per episode) would never come back down to the first episode's count.
    wait_for(lambda: threading.active_count() <= counts[0], timeout=30.0,
             what=f"the thread count to settle back to {counts[0]} (after each episode: {counts})")
