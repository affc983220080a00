"""ROS 2 adapters: the only subpackage that imports rclpy.

Thin nodes (``mapping_node``, ``localization_node``, ``sim_node``) around the
ROS-free core (:mod:`dmn_ros.localizer`, :mod:`dmn_ros.maps`,
:mod:`dmn_ros.images`), message conversions in :mod:`.conversions`, pure
transform math in :mod:`.transforms` and every parameter's default in
:mod:`.params`. Import the node modules explicitly; this package imports
nothing from rclpy itself so that :mod:`.transforms` stays usable without ROS.
"""

__all__ = ["conversions", "localization_node", "mapping_node", "params", "sim_node", "transforms"]
