"""Topic names and message types the bag tools read and write, shared with the nodes' defaults."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

__all__ = ["IMAGE_TYPES", "POSE_TYPES", "TOPIC_OPTIONS", "TopicNames", "absolute", "add_topic_options",
           "topics_from_args"]

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
"""Camera and context image types."""
POSE_TYPES = ("geometry_msgs/msg/PoseStamped", "geometry_msgs/msg/PoseWithCovarianceStamped", "nav_msgs/msg/Odometry")
"""Types a pose can be read from (ground truth, context poses, estimates)."""
ODOM_TYPES = ("nav_msgs/msg/Odometry",)
TF_TYPES = ("tf2_msgs/msg/TFMessage",)


def absolute(name: str) -> str:
    """``camera/image`` → ``/camera/image``: bags store fully qualified names (root namespace)."""
    return name if name.startswith("/") else "/" + name


@dataclass(frozen=True)
class TopicNames:
    """Where each stream lives in a bag; defaults match sim_node, mapping_node and localization_node."""

    camera: str = "/camera/image"
    """Query images (``Image``, or ``CompressedImage`` — a ``/compressed`` suffix is tried too)."""
    odom: str = "/odom"
    """``nav_msgs/Odometry`` (odom → base_link) for egomotion."""
    ground_truth: str = "/ground_truth"
    """True pose in the map frame (``PoseStamped``, ``PoseWithCovarianceStamped`` or ``Odometry``)."""
    context_image: str = "/context/image"
    """Context images for the map (mapping_node's input)."""
    context_pose: str = "/context/pose"
    """Context poses in the map frame, paired with images by stamp."""
    tf: str = "/tf"
    """``tf2_msgs/TFMessage`` (written by the recorder; not needed by the evaluation)."""
    estimate: str = "/dmn_pose"
    """The localizer's output (``PoseWithCovarianceStamped``); scored with ``--estimate-topic``/``--live``."""

    def normalized(self) -> TopicNames:
        return TopicNames(**{f.name: absolute(getattr(self, f.name)) for f in fields(self)})


TOPIC_OPTIONS = ("camera", "odom", "ground_truth", "context_image", "context_pose")
"""The :class:`TopicNames` fields the bag tools take as ``--<field>-topic`` options."""


def add_topic_options(ap: argparse.ArgumentParser) -> None:
    """``--camera-topic``, ``--odom-topic``, ``--ground-truth-topic``, ``--context-image-topic``,
    ``--context-pose-topic`` (defaults: :class:`TopicNames`'); read back with :func:`topics_from_args`."""
    for f in TOPIC_OPTIONS:
        ap.add_argument(f"--{f.replace('_', '-')}-topic", default=getattr(TopicNames(), f))


def topics_from_args(args: argparse.Namespace, **others: str) -> TopicNames:
    """The :class:`TopicNames` of the options :func:`add_topic_options` added (``others``: the remaining fields)."""
    return TopicNames(**{f: getattr(args, f"{f}_topic") for f in TOPIC_OPTIONS}, **others)
