"""ObservationSync: what the real-time loop plans from. The history must be what the model was
trained on and what the harness feeds it: frames exactly one control period apart, each camera
frame paired with the joint state of its own instant, whatever the timing of the command tick that
samples it. Pure logic, stamps injected (no clocks, no ROS)."""

import numpy as np

from smp_ros.runtime.policy_runner import ObservationSync

DT = 0.05  # control period (20 Hz)
CAMERA = "cam_high"


def make_sync(obs_steps: int = 2) -> ObservationSync:
    return ObservationSync((CAMERA,), {"left": "/left/joint_states", "right": "/right/joint_states",
                                       CAMERA: "/cameras/cam_high/image_raw"},
                           slop_s=0.05, stale_after_s=0.2, obs_steps=obs_steps, control_rate_hz=1 / DT)


def joints(t: float) -> np.ndarray:
    return np.full(7, t)  # the joint state encodes its own stamp


def image(t: float) -> np.ndarray:
    return np.full((4, 4, 3), int(round(t * 100)) % 256, dtype=np.uint8)  # so does the frame


def feed(sync: ObservationSync, t0: float, t1: float) -> None:
    """Joint states at 200 Hz and camera frames at 20 Hz over [t0, t1), in stamp order."""
    for k in range(int(round(t0 * 200)), int(round(t1 * 200))):
        t = k / 200
        for arm in ("left", "right"):
            sync.add_joints(arm, t, joints(t))
        if k % 10 == 0:
            sync.add_image(CAMERA, t, image(t))


def test_frames_are_one_control_period_apart_after_a_stalled_tick():
    sync = make_sync()
    feed(sync, 0.0, 0.203)
    assert sync.sample() is not None  # the tick samples at t = 0.2 (the newest camera frame)
    feed(sync, 0.203, 0.353)  # then the tick stalls for 150 ms: three camera frames pass unsampled
    assert sync.sample() is not None
    frames = sync.frames()
    stamps = [f.stamp for f in frames]
    np.testing.assert_allclose(stamps, [0.30, 0.35])  # exactly dt apart, not the 0.2 sampled before
    for f in frames:
        # each camera frame with the joint state of its own instant, and two distinct frames
        np.testing.assert_allclose(f.qpos, f.stamp)
        assert f.images[0, 0, 0, 0] == int(round(f.stamp * 100))


def test_the_newest_frame_is_the_camera_instant_not_the_newest_joint_state():
    sync = make_sync()
    feed(sync, 0.0, 0.139)  # joint states up to 0.135, the newest camera frame at 0.10
    frame = sync.sample()
    assert frame.stamp == 0.10
    np.testing.assert_allclose(frame.qpos, 0.10)
    assert sync.camera_skews[-1] == 0.0


def test_a_reset_never_plans_from_samples_taken_before_it():
    sync = make_sync()
    feed(sync, 0.0, 0.203)
    assert sync.sample() is not None
    sync.reset(since=0.21)
    assert sync.sample() is None  # nothing newer than the reset yet
    feed(sync, 0.203, 0.253)  # a camera frame at 0.25
    assert sync.sample() is not None
    frames = sync.frames()
    # t - dt = 0.20 is before the reset: the fresh history repeats the first frame after it
    assert [f.stamp for f in frames] == [0.25, 0.25]
    assert all(f.images[0, 0, 0, 0] == 25 for f in frames)


def test_history_of_three_steps_reaches_back_two_periods():
    sync = make_sync(obs_steps=3)
    feed(sync, 0.0, 0.253)
    assert sync.sample() is not None
    np.testing.assert_allclose([f.stamp for f in sync.frames()], [0.15, 0.20, 0.25])
