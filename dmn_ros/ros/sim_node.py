"""sim_node: a robot driving through a simulated maze, publishing what a real robot would.

Publishes camera images, noisy odometry (``odom → base``, starting at the origin and
continuous across episodes), ground truth (``PoseStamped`` in the global frame) and a
set of context image-pose pairs for the mapping node. With ``rate > 0`` a timer on the steady
(wall) clock drives it, also under ``use_sim_time``: with ``publish_clock`` this node is the
``/clock`` source, so a timer on ROS time would wait for itself forever.
:meth:`SimNode.step_once` and :meth:`SimNode.reset` let a caller (the demo, tests) drive it in
lock-step. ``kidnap_at_step = N > 0`` teleports the robot to a random free
pose (more than 15 m away) at the N-th frame of each world (then it drives on from there) while odometry
reports no motion: the kidnapped-robot test of docs/health.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import Odometry
from rclpy.clock import Clock as RclpyClock
from rclpy.clock import ClockType
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image

from dmn_ros.data import egomotion_from_poses
from dmn_ros.geometry import compose, wrap_angle
from dmn_ros.ros import params
from dmn_ros.ros.conversions import rgb_to_image_msg, sec_to_stamp, xyyaw_to_pose
from dmn_ros.ros.mapping_node import CONTEXT_QOS

SENSOR_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


class SimNode(Node):
    """Drives along a stored smooth trajectory (then back), in the world of ``world_seed``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("sim_node", **kwargs)
        self.p = params.declare(self, params.SIM)
        self.img_pub = self.create_publisher(Image, self.p["camera_topic"], SENSOR_QOS)
        self.odom_pub = self.create_publisher(Odometry, self.p["odom_topic"], SENSOR_QOS)
        self.gt_pub = self.create_publisher(PoseStamped, self.p["ground_truth_topic"], SENSOR_QOS)
        self.ctx_img_pub = self.create_publisher(Image, self.p["context_image_topic"], CONTEXT_QOS)
        self.ctx_pose_pub = self.create_publisher(PoseStamped, self.p["context_pose_topic"], CONTEXT_QOS)
        self.clock_pub = self.create_publisher(Clock, "/clock", 10) if self.p["publish_clock"] else None
        self.world: Any = None
        self.sim_time = 1000.0
        """Simulated seconds (used for stamps when publish_clock is on)."""
        self.odom_pose = np.zeros(3)
        self._ctx_subs_seen = 0
        self.reset(int(self.p["world_seed"]))
        if float(self.p["rate"]) > 0:
            # Wall-time timers: with use_sim_time the node's ROS clock only moves when /clock arrives, and with
            # publish_clock this node is the /clock source, so timers on it would never fire.
            wall = RclpyClock(clock_type=ClockType.STEADY_TIME)
            self.create_timer(1.0 / float(self.p["rate"]), self.step_once, clock=wall)
            self.create_timer(1.0, self._maybe_publish_contexts, clock=wall)
        if self.get_parameter("use_sim_time").value and self.clock_pub is None:
            self.get_logger().warning("use_sim_time is true but publish_clock is false: stamps follow /clock "
                                      "from another source (0 until one publishes)")

    def reset(self, world_seed: int) -> None:
        """Build the world of ``world_seed``, a new trajectory and contexts; odometry stays continuous."""
        from dmn_ros.worlds import make_world, smooth_trajectory

        if self.world is not None:
            self.world.close()
        size = int(self.p["image_size"])
        self.world_seed = int(world_seed)
        self.world = make_world(self.p["domain"], seed=self.world_seed, image_size=(size, size))
        self.rng = np.random.default_rng(self.world_seed)
        n = int(self.p["trajectory_steps"])
        self.trajectory = smooth_trajectory(self.world, self.rng, steps=n)
        if self.p["contexts_from"] == "trajectory":
            drive = smooth_trajectory(self.world, self.rng, steps=max(4 * int(self.p["num_contexts"]), 8))
            pick = np.linspace(0, len(drive) - 1, int(self.p["num_contexts"])).round().astype(int)
            self.context_poses = drive[pick]
        else:
            self.context_poses = self.world.sample_free_poses(int(self.p["num_contexts"]), self.rng)
        self.context_images = self.world.render(self.context_poses)
        self.context_base_stamp = self._now() - len(self.context_poses) - 1.0
        self.index = -1
        self._trajectory_start = 0
        """Frame index at which ``trajectory`` starts (moves when the robot is kidnapped)."""
        self.kidnapped_at: int | None = None
        """Frame index of the last kidnapping in this world, None if none."""
        self.truth: np.ndarray | None = None
        self._ctx_subs_seen = 0
        self.get_logger().info(f"world {self.p['domain']} seed {self.world_seed}: {n}-step trajectory, "
                               f"{len(self.context_poses)} contexts")

    def _now(self) -> float:
        if self.clock_pub is not None:
            return self.sim_time
        return self.get_clock().now().nanoseconds * 1e-9

    def publish_contexts(self) -> None:
        """Publish every context pair (stamps fixed per world, so re-sending is idempotent)."""
        frame = self.p["global_frame_id"]
        for i, (img, pose) in enumerate(zip(self.context_images, self.context_poses, strict=True)):
            stamp = sec_to_stamp(self.context_base_stamp + i)
            ps = PoseStamped()
            ps.header.stamp, ps.header.frame_id = stamp, frame
            ps.pose = xyyaw_to_pose(pose)
            self.ctx_pose_pub.publish(ps)
            self.ctx_img_pub.publish(rgb_to_image_msg(img, stamp=stamp, frame_id=self.p["camera_frame_id"],
                                                      encoding=self.p["image_encoding"]))

    def _maybe_publish_contexts(self) -> None:
        n = min(self.ctx_img_pub.get_subscription_count(), self.ctx_pose_pub.get_subscription_count())
        if n > self._ctx_subs_seen:
            self.publish_contexts()
        self._ctx_subs_seen = n

    def _trajectory_pose(self, k: int) -> np.ndarray:
        n = len(self.trajectory)
        period = 2 * (n - 1)
        j = k % period
        if j < n:
            return self.trajectory[j]
        back = self.trajectory[period - j].copy()  # drive back: same path, reversed heading
        back[2] = wrap_angle(back[2] + np.pi)
        return back

    def _kidnap(self) -> None:
        """Teleport: a new trajectory from a random free pose far away, starting at this frame.

        The rule (:func:`dmn_ros.worlds.kidnapped_trajectory`) is shared with ``dmn-bag-record --kidnap-at-step``.
        """
        from dmn_ros.worlds import kidnapped_trajectory

        self.trajectory = kidnapped_trajectory(self.world, self.rng, self.truth, steps=len(self.trajectory))
        start = self.trajectory[0]
        self._trajectory_start = self.index
        self.kidnapped_at = self.index
        old = self.truth if self.truth is not None else start
        self.get_logger().warning(f"kidnapped at frame {self.index + 1}: ({old[0]:.1f}, {old[1]:.1f}) -> "
                                  f"({start[0]:.1f}, {start[1]:.1f}), odometry unaware")

    def step_once(self) -> float:
        """Advance one pose; publish odometry, ground truth and the camera image. Returns the stamp (s)."""
        self.index += 1
        kidnap = int(self.p["kidnap_at_step"]) > 0 and self.index + 1 == int(self.p["kidnap_at_step"])
        if kidnap:
            self._kidnap()
        truth = self._trajectory_pose(self.index - self._trajectory_start)
        if self.truth is not None and not kidnap:  # a kidnapped robot's odometry feels nothing
            noisy, _ = egomotion_from_poses(
                np.stack([self.truth, truth]), rng=self.rng,
                noise_std=(float(self.p["odom_noise_xy"]), float(self.p["odom_noise_yaw"])),
            )
            self.odom_pose = compose(self.odom_pose, noisy[1])
        self.truth = truth
        if self.clock_pub is not None:
            self.sim_time += 1.0 / max(float(self.p["rate"]), 1.0)
            self.clock_pub.publish(Clock(clock=sec_to_stamp(self.sim_time)))
        t = self._now()
        stamp = sec_to_stamp(t)
        od = Odometry()
        od.header.stamp, od.header.frame_id = stamp, self.p["odom_frame_id"]
        od.child_frame_id = self.p["base_frame_id"]
        od.pose.pose = xyyaw_to_pose(self.odom_pose)
        self.odom_pub.publish(od)
        gt = PoseStamped()
        gt.header.stamp, gt.header.frame_id = stamp, self.p["global_frame_id"]
        gt.pose = xyyaw_to_pose(truth)
        self.gt_pub.publish(gt)
        img = self.world.render(truth[None])[0]
        self.img_pub.publish(rgb_to_image_msg(img, stamp=stamp, frame_id=self.p["camera_frame_id"],
                                              encoding=self.p["image_encoding"]))
        return t

    def destroy_node(self) -> None:
        if self.world is not None:
            self.world.close()
            self.world = None
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    from dmn_ros.ros.spin import run_node

    run_node(SimNode, args=args)
