"""Rosbag2 tools: record synthetic episodes, evaluate bags offline through the Localizer, replay them live.

``record`` writes bags from the simulated worlds; ``reader`` loads the streams an
evaluation needs; ``evaluate`` replays them through :class:`dmn_ros.localizer.Localizer`
(the filter the localization node runs) and scores the result; ``play`` publishes a bag
into a live ROS graph (the only module here that imports rclpy, lazily). Errors are in
``errors``.
"""

from dmn_ros.bags.errors import (
    BagError,
    BagReadError,
    MissingTopicError,
    TruncatedBagError,
    UnknownMessageTypeError,
)
from dmn_ros.bags.topics import TopicNames

__all__ = [
    "BagError",
    "BagReadError",
    "MissingTopicError",
    "TopicNames",
    "TruncatedBagError",
    "UnknownMessageTypeError",
]
