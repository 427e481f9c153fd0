"""Nodes spinning in a test: the executor every process of the package spins (ros_util.PoolExecutor)
in a daemon thread, torn down in the order that leaves no callback running on a destroyed node.

Import it after the test module has set ROS_DOMAIN_ID (it imports rclpy through ros_util)."""

from __future__ import annotations

import threading

from smp_ros.nodes.ros_util import PoolExecutor, shutdown_nodes


class Spinning:
    """``nodes`` spun by a PoolExecutor of ``num_threads`` in a background thread, from construction
    until :meth:`close` (or the end of a ``with`` block)."""

    def __init__(self, *nodes, num_threads: int = 4, start: bool = True) -> None:
        self.executor = PoolExecutor(num_threads=num_threads)
        self.nodes: list = []
        self.thread = threading.Thread(target=self.executor.spin, name="test-executor", daemon=True)
        for node in nodes:
            self.add(node)
        if start:
            self.start()

    def add(self, node):
        """Spin ``node`` too (also after start); returns it."""
        self.executor.add_node(node)
        self.nodes.append(node)
        return node

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop spinning: callbacks already handed to the pool finish, the executor and its pool stop
        and the spinning thread ends. The nodes stay (to read what they hold before :meth:`close`)."""
        shutdown_nodes(None, self.executor, [])
        self.executor.shutdown()  # waits for callbacks still running in the pool
        if self.thread.is_alive():
            self.thread.join()

    def close(self) -> None:
        """:meth:`stop`, then destroy the nodes (newest first)."""
        self.stop()
        for node in reversed(self.nodes):
            node.destroy_node()
        self.nodes.clear()

    def __enter__(self) -> "Spinning":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
