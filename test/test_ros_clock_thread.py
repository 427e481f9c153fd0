"""The policy node's command clock (``ros_util.ClockThread``): ticks on the node's clock, wall or
simulated, never ahead of it; skips what a long tick missed instead of bursting; a tick that escapes
its guard marks the node dead. Checked by causality and counts, never by wall-clock rates."""

import os
import time

import pytest
from waiting import wait_for

pytestmark = pytest.mark.ros

os.environ.setdefault("ROS_DOMAIN_ID", str(20 + os.getpid() % 80))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

import rclpy  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402

from smp_ros.nodes.ros_util import ClockThread, GuardedNode, to_stamp  # noqa: E402
from smp_ros.nodes.sim_node import CLOCK_QOS  # noqa: E402
from ros_helpers import Spinning  # noqa: E402

PERIOD_S = 0.01


class Clocked(GuardedNode, Node):
    pass


@pytest.fixture
def ros():
    rclpy.init()
    try:
        yield
    finally:
        rclpy.try_shutdown()


def test_ticks_on_the_wall_clock_and_stops(ros):
    node = Clocked("clock_thread_wall")
    stamps = []
    clock = ClockThread(node, PERIOD_S, lambda: stamps.append(node.get_clock().now().nanoseconds), "test clock")
    started = node.get_clock().now().nanoseconds  # the thread's first deadline is at least a period after this
    clock.start()
    try:
        wait_for(lambda: len(stamps) >= 20, timeout=30.0, what="20 ticks")
    finally:
        clock.stop()
    n = len(stamps)
    time.sleep(5 * PERIOD_S)
    assert len(stamps) == n, "ticked after stop()"
    # Absolute deadlines t0 + n T (t0 >= started, skipped periods only move them later): tick k never runs
    # before started + (k + 1) T, whatever the load. (A late tick 0 says nothing about tick 1's deadline.)
    for k, t in enumerate(stamps):
        due = started + (k + 1) * PERIOD_S * 1e9
        assert t >= due - 1e6, f"tick {k} ran {(due - t) / 1e6:.1f} ms early"
    assert clock.ticks == n
    assert node.fatal_error == ""
    node.destroy_node()


def test_a_long_tick_skips_the_periods_it_missed(ros):
    node = Clocked("clock_thread_skip")
    ticks = []

    def tick():
        ticks.append(time.monotonic())
        if len(ticks) == 3:
            time.sleep(3.5 * PERIOD_S)  # the next deadline passes by more than two whole periods

    clock = ClockThread(node, PERIOD_S, tick, "test clock")
    clock.start()
    try:
        wait_for(lambda: len(ticks) >= 6, timeout=30.0, what="6 ticks")
    finally:
        clock.stop()
    assert clock.skipped >= 2, f"skipped {clock.skipped} periods after a tick of 3.5 periods"
    node.destroy_node()


def test_follows_simulated_time_and_never_runs_ahead_of_it(ros):
    node = Clocked("clock_thread_sim", parameter_overrides=[Parameter("use_sim_time", value=True)])
    source = rclpy.create_node("clock_thread_source")
    clock_pub = source.create_publisher(Clock, "/clock", CLOCK_QOS)
    stamps = []
    sim_time = {"ns": 1_000_000_000}

    def publish_clock():
        clock_pub.publish(Clock(clock=to_stamp(sim_time["ns"] / 1e9)))

    with Spinning(node, source):
        publish_clock()
        wait_for(lambda: node.get_clock().now().nanoseconds == sim_time["ns"], timeout=30.0,
                 what="the node on simulated time")
        clock = ClockThread(node, PERIOD_S, lambda: stamps.append(node.get_clock().now().nanoseconds),
                            "test clock")
        clock.start()
        try:
            time.sleep(20 * PERIOD_S)  # 0.2 s of wall time, simulated time stands still
            assert stamps == [], "ticked while simulated time stood still"
            start = sim_time["ns"]
            for _ in range(50):  # 0.5 s of simulated time in 10 ms steps
                sim_time["ns"] += int(PERIOD_S * 1e9)
                publish_clock()
                time.sleep(0.002)
            wait_for(lambda: stamps, timeout=30.0, what="a tick on simulated time")
            time.sleep(0.1)
            n = len(stamps)
            assert n <= 50, f"{n} ticks in 50 periods of simulated time"
            assert all(start < t <= sim_time["ns"] for t in stamps)
            time.sleep(20 * PERIOD_S)
            assert len(stamps) == n, "ticked while simulated time stood still"
        finally:
            clock.stop(timeout=0.1)  # the thread sleeps on paused simulated time: stop() must not wait for it
        sim_time["ns"] += int(PERIOD_S * 1e9)
        publish_clock()  # wakes it: it leaves without ticking
        time.sleep(0.1)
        assert len(stamps) == n, "ticked after stop()"
    node.destroy_node()
    source.destroy_node()


def test_a_tick_that_escapes_its_guard_marks_the_node_dead(ros):
    node = Clocked("clock_thread_fatal")

    def tick():
        raise RuntimeError("a bug outside any guard")

    clock = ClockThread(node, PERIOD_S, tick, "test clock")
    clock.start()
    wait_for(lambda: node.fatal_error, timeout=30.0, what="fatal_error")
    assert "test clock stopped" in node.fatal_error and "a bug outside any guard" in node.fatal_error
    clock.stop()
    node.destroy_node()


def test_a_guarded_tick_is_contained_and_keeps_ticking(ros):
    node = Clocked("clock_thread_guarded")
    calls = []

    def tick():
        calls.append(1)
        if len(calls) % 2:
            raise ZeroDivisionError("a bug in the tick")

    clock = ClockThread(node, PERIOD_S, node.guard.wrap("timer tick", tick), "test clock")
    clock.start()
    try:
        wait_for(lambda: len(calls) >= 6, timeout=30.0, what="6 ticks")
    finally:
        clock.stop()
    assert node.fatal_error == ""
    assert node.guard.errors >= 3
    node.destroy_node()


def _fifo_allowed() -> bool:
    import threading

    allowed = []

    def probe():
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            allowed.append(True)
        except (AttributeError, OSError):
            allowed.append(False)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return allowed[0]


def test_a_real_time_priority_is_applied_to_the_clock_thread_only_or_refused_with_a_warning(ros, capfd):
    node = Clocked("clock_thread_priority")
    policies = []
    clock = ClockThread(node, PERIOD_S, lambda: policies.append(os.sched_getscheduler(0)), "test clock",
                        priority=10)
    clock.start()
    try:
        wait_for(lambda: len(policies) >= 3, timeout=30.0, what="3 ticks")
    finally:
        clock.stop()
    if _fifo_allowed():
        assert clock.realtime and set(policies) == {os.SCHED_FIFO}
        assert os.sched_getscheduler(0) == os.SCHED_OTHER, "the caller's thread must keep its scheduling"
    else:
        assert not clock.realtime and set(policies) == {os.SCHED_OTHER}
        assert "cannot run at SCHED_FIFO priority 10" in capfd.readouterr().err
    with pytest.raises(ValueError, match="priority"):
        ClockThread(node, PERIOD_S, lambda: None, "test clock", priority=100)
    node.destroy_node()
