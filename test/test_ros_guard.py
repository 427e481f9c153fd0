"""The callback guard on a real rclpy node and executor: an exception in a callback is contained,
counted, logged rate-limited and turned into a hold; the executor and the node's other callbacks
keep running; the callback recovers when good input returns."""

import os

import pytest
from waiting import wait_for

pytestmark = pytest.mark.ros

os.environ.setdefault("ROS_DOMAIN_ID", str(20 + os.getpid() % 80))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

import rclpy  # noqa: E402
from rclpy.node import Node  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from smp_ros.nodes.ros_util import GuardedNode, PoolExecutor, RefusedInput, Spinner, shutdown_nodes  # noqa: E402


class Fragile(GuardedNode, Node):
    """Fails on 'bad' (a bug) and refuses 'refuse' (bad input); counts ticks of a healthy timer."""

    def __init__(self):
        super().__init__("fragile")
        self.received, self.ticks, self.holds, self.recoveries = [], 0, [], []
        self.create_subscription(String, "/guard_test/in", self._on_message, 10)
        self.create_timer(0.01, self._tick)
        self.create_service(Trigger, "/guard_test/explode", self._explode)

    def _on_message(self, msg):
        if msg.data == "bad":
            raise ZeroDivisionError("a bug in the callback")
        if msg.data == "refuse":
            raise RefusedInput("/guard_test/in: 'refuse' is not acceptable; expected anything else")
        self.received.append(msg.data)

    def _tick(self):
        self.ticks += 1

    def _explode(self, request, response):
        raise RuntimeError("service bug")

    def on_callback_fault(self, name, message):
        self.holds.append((name, message))

    def on_callback_recovered(self, name):
        self.recoveries.append(name)


@pytest.fixture
def graph():
    rclpy.init()
    node = Fragile()
    sender = rclpy.create_node("guard_sender")
    executor = PoolExecutor(num_threads=3)
    executor.add_node(node)
    executor.add_node(sender)
    spinner = Spinner(executor, [node, sender]).start()
    try:
        yield node, sender, spinner
    finally:
        shutdown_nodes(spinner, executor, [node, sender])
        rclpy.try_shutdown()


def test_an_exception_in_a_callback_is_contained_and_held_on(graph, capfd):
    node, sender, spinner = graph
    pub = sender.create_publisher(String, "/guard_test/in", 10)
    wait_for(lambda: pub.get_subscription_count() >= 1, what="discovery")
    topic_fault = "subscription /guard_test/in"
    wait_for(lambda: (pub.publish(String(data="bad")), node.guard.errors >= 20)[1], what="20 contained failures")
    assert spinner.running() and not spinner.failure  # the executor survived
    ticks = node.ticks
    wait_for(lambda: node.ticks > ticks + 5, what="the node's timer to keep running")
    assert node.holds and node.holds[0][0] == topic_fault and "ZeroDivisionError" in node.holds[0][1]
    assert node.guard.reason().startswith(f"{topic_fault} failing")
    # Recovers with good input.
    # The guard clears the fault after the callback returns, i.e. after ``received`` is appended to:
    # wait for the recovery itself (a loaded machine can run this thread in between).
    wait_for(lambda: (pub.publish(String(data="good")), node.recoveries)[1], what="recovery on a good message")
    assert node.received and node.guard.reason() == "" and node.recoveries == [topic_fault]
    err = capfd.readouterr().err
    assert err.count("Traceback") == 1, "the traceback is logged once, not per failure"
    assert f"{topic_fault} recovered (" in err

    # Refused input: logged with its message, no traceback.
    pub.publish(String(data="refuse"))
    wait_for(lambda: node.guard.reason() != "", what="the refusal")
    assert "'refuse' is not acceptable" in node.guard.reason()
    wait_for(lambda: (pub.publish(String(data="fine")), node.guard.reason() == "")[1], what="recovery")
    err = capfd.readouterr().err
    assert "refused" in err and "Traceback" not in err


def test_a_failing_service_answers_and_does_not_hold(graph):
    node, sender, spinner = graph
    client = sender.create_client(Trigger, "/guard_test/explode")
    assert client.wait_for_service(timeout_sec=10.0)
    future = client.call_async(Trigger.Request())
    wait_for(future.done, what="the service's answer")
    assert not future.result().success and "service bug" in future.result().message
    assert node.guard.errors == 1 and node.guard.reason() == "" and spinner.running()


def test_a_node_that_reports_a_fatal_error_ends_the_spinner(graph):
    node, _, spinner = graph
    node.fatal_error = "its own thread died"
    wait_for(lambda: not spinner.running(), what="the spinner to stop")
    assert "its own thread died" in spinner.failure
