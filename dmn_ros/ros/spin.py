"""The console-script entry shared by the nodes: init, spin until Ctrl-C or shutdown, clean up."""

from __future__ import annotations

from collections.abc import Callable

import rclpy
import rclpy.executors
from rclpy.node import Node


def run_node(make_node: Callable[[], Node], *, args: list[str] | None = None, threads: int = 1) -> None:
    """``threads > 1`` uses a MultiThreadedExecutor.

    localization_node runs with two threads: its worker timer filters in one while the other serves
    odometry and image callbacks, which take only the short input lock, not the lock a filter step
    holds. ``initialpose``, map and service callbacks do wait for a running step (they change the
    belief or the map), and while one waits, odometry and frames (same callback group) wait too.
    """
    rclpy.init(args=args)
    node = make_node()
    executor = (rclpy.executors.MultiThreadedExecutor(num_threads=threads) if threads > 1
                else rclpy.executors.SingleThreadedExecutor())
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
