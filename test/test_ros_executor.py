"""ros_util.PoolExecutor on real rclpy nodes: every ready callback is handed to the thread pool once
(rclpy 9.1's MultiThreadedExecutor queues a task again on every wake-up until a pool thread starts
it), callbacks still run concurrently, and a coroutine callback that suspends on an awaited future
is resumed and completes."""

import os
import threading
import time
from collections import Counter

import pytest
from waiting import wait_for

pytestmark = pytest.mark.ros

os.environ.setdefault("ROS_DOMAIN_ID", str(20 + os.getpid() % 80))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

import rclpy  # noqa: E402
from rclpy.callback_groups import ReentrantCallbackGroup  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from std_msgs.msg import Int32  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from smp_ros.nodes.ros_util import PoolExecutor  # noqa: E402
from ros_helpers import Spinning  # noqa: E402


def counting(executor_class):
    """``executor_class`` with its pool's submissions counted per task (the same object submitted
    twice is a duplicate)."""

    class Counting(executor_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.submitted = Counter()
            submit = self._executor.submit

            def counted(fn, *a, **k):
                task = a[0] if a else fn  # PoolExecutor submits (_run_task, task, ...); rclpy the task
                self.submitted[task] += 1  # (the object, kept alive: ids of freed tasks are reused)
                return submit(fn, *a, **k)

            self._executor.submit = counted

    return Counting


def run_burst(executor_class, messages=300):
    """A burst of messages into a subscription whose callback is slow enough that tasks wait in
    the pool's queue; returns (messages received, the executor)."""
    rclpy.init()
    node = rclpy.create_node("executor_burst")
    received = []
    group = ReentrantCallbackGroup()

    def on_message(msg):
        time.sleep(0.002)  # busy enough that the pool is behind: tasks wait in its queue
        received.append(msg.data)

    node.create_subscription(Int32, "/executor_test/burst", on_message, 1000, callback_group=group)
    pub = node.create_publisher(Int32, "/executor_test/burst", 1000)
    executor = counting(executor_class)(num_threads=2)
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    try:
        wait_for(lambda: pub.get_subscription_count() >= 1, what="the subscription to match")
        for i in range(messages):
            pub.publish(Int32(data=i))
        wait_for(lambda: len(received) == messages, timeout=120.0, what=f"{messages} messages")
        return received, executor
    finally:
        executor.shutdown()
        thread.join()
        node.destroy_node()
        rclpy.try_shutdown()


def test_each_task_is_submitted_once():
    received, executor = run_burst(PoolExecutor)
    assert sorted(received) == list(range(300))  # every message, once
    duplicates = {task: n for task, n in executor.submitted.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} task(s) handed to the pool more than once"


@pytest.mark.slow
def test_rclpy_executor_submits_queued_tasks_again():
    """What PoolExecutor exists for: kept to notice when rclpy no longer needs it."""
    _, executor = run_burst(MultiThreadedExecutor)
    assert any(n > 1 for n in executor.submitted.values())


def test_a_suspended_coroutine_callback_is_resumed():
    """An async service callback awaiting another service's reply (same executor) completes."""
    rclpy.init()
    node = rclpy.create_node("executor_async")
    group = ReentrantCallbackGroup()
    inner_calls = []

    def inner(request, response):
        inner_calls.append(1)
        response.success, response.message = True, "inner"
        return response

    client = node.create_client(Trigger, "/executor_test/inner", callback_group=group)

    async def outer(request, response):
        reply = await client.call_async(Trigger.Request())  # suspends this task until the reply
        response.success, response.message = reply.success, f"outer after {reply.message}"
        return response

    node.create_service(Trigger, "/executor_test/inner", inner, callback_group=group)
    node.create_service(Trigger, "/executor_test/outer", outer, callback_group=group)
    caller = rclpy.create_node("executor_async_caller")
    outer_client = caller.create_client(Trigger, "/executor_test/outer")
    try:
        with Spinning(node, caller, num_threads=3):
            assert outer_client.wait_for_service(timeout_sec=30.0)
            future = outer_client.call_async(Trigger.Request())
            wait_for(future.done, timeout=60.0, what="the outer service's reply")
            assert future.result().success and future.result().message == "outer after inner"
            assert inner_calls == [1]
    finally:
        rclpy.try_shutdown()


def _thread_cpu_s(native_id: int) -> float:
    """CPU time (user + system) a thread of this process has used so far (Linux /proc)."""
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_spinning_thread_sleeps_while_its_pool_is_busy():
    """Every pool thread busy in a long callback and a message waiting for the pool: the thread that
    spins the executor must wait, not ask rclpy again and again (which held the GIL the pool needs and
    spun a core at 100 %). Measured as the CPU time the spinning thread uses while the pool is busy:
    sleeping, it uses almost none; without the wait it used all of the window (0.96-0.98 s)."""
    rclpy.init()
    node = rclpy.create_node("executor_busy_pool")
    group = ReentrantCallbackGroup()
    release, started, received = threading.Event(), threading.Event(), []

    def slow(msg):
        started.set()
        release.wait(10.0)  # the only pool thread is taken (and waits without the GIL)

    def fast(msg):
        received.append(msg.data)

    node.create_subscription(Int32, "/executor_test/slow", slow, 10, callback_group=group)
    node.create_subscription(Int32, "/executor_test/fast", fast, 10, callback_group=group)
    pub_slow = node.create_publisher(Int32, "/executor_test/slow", 10)
    pub_fast = node.create_publisher(Int32, "/executor_test/fast", 10)
    executor = PoolExecutor(num_threads=1)
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    try:
        wait_for(lambda: pub_slow.get_subscription_count() >= 1 and pub_fast.get_subscription_count() >= 1,
                 what="the subscriptions to match")
        pub_slow.publish(Int32(data=0))
        assert started.wait(30.0)
        pub_fast.publish(Int32(data=1))  # ready, but the pool cannot take it until slow returns
        before = _thread_cpu_s(thread.native_id)
        time.sleep(1.0)
        used = _thread_cpu_s(thread.native_id) - before
        release.set()
        wait_for(lambda: received == [1], what="the waiting message once the pool is free")
        assert used < 0.3, f"the spinning thread used {used:.2f} s of CPU in 1 s while its pool was busy"
    finally:
        release.set()
        executor.shutdown()
        thread.join()
        node.destroy_node()
        rclpy.try_shutdown()
