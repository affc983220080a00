"""dmn_ros: visual localization with Differentiable Mapping Networks.

The package's core (geometry, model, filter, data, training, evaluation,
export) is ROS-free; only :mod:`dmn_ros.ros` imports rclpy.
"""

__version__ = "0.1.0"
