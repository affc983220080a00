"""Launch DMN visual localization on a ROS 2 install: ``ros2 launch dmn_ros dmn_localize.launch.py``.

Starts ``localization_node`` and, with ``start_mapping:=true``, ``mapping_node``;
``demo:=true`` adds ``sim_node`` (a simulated maze robot; with ``use_sim_time:=true`` it also
publishes ``/clock``, the other nodes' time source). Parameters come from
``params_file`` (default: the package's ``config/dmn_localize.yaml``); ``model`` and
``map_file`` override the file's ``model_path`` / ``map_file`` when non-empty.
Here (pip-installed ROS, no ``launch``) ``make demo`` composes the same nodes with the
same YAML in one process instead (``dmn_ros/demo.py``).

In a namespace (the ``namespace`` argument, one robot of a fleet, ``docs/multirobot.md``, or
an enclosing ``PushROSNamespace``/``GroupAction`` that includes this file) the YAML's plain
``mapping_node:`` sections would not match ``/robot1/mapping_node``, so each node then
gets its merged sections as a parameter dict instead of the file.
"""

import os

import yaml
from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch_ros.actions import Node

from launch import LaunchDescription


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _params_for(params_file: str, name: str, namespace: str) -> dict:
    """The parameters a node ``name`` in ``namespace`` gets from ``params_file``, as rcl would match them
    without the namespace: ``/**``, ``/**/<name>``, ``<name>``, ``/<name>`` and ``/<namespace>/<name>``."""
    with open(params_file) as f:
        doc = yaml.safe_load(f) or {}
    ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
    out: dict = {}
    for key in ("/**", "/**/" + name, name, "/" + name, f"{ns}/{name}"):
        out.update(_flatten((doc.get(key) or {}).get("ros__parameters") or {}))
    return out


def _effective_namespace(ros_namespace: str, namespace: str) -> str:
    """The nodes' namespace as launch_ros resolves it (``prefix_namespace``), without slashes at the ends:
    ``namespace`` if absolute, else ``ros_namespace/namespace``; ``""`` for the root namespace."""
    if namespace.startswith("/"):
        return namespace.strip("/")
    return "/".join(p for p in (ros_namespace.strip("/"), namespace.strip("/")) if p)


def _nodes(context, *_args, **_kwargs) -> list:
    """Built at launch time so that empty ``model``/``map_file`` arguments leave the YAML's values alone."""
    cfg = context.launch_configurations
    params_file = cfg["params_file"]
    use_sim_time = cfg["use_sim_time"].lower() in ("true", "1", "yes")
    loc_over = {"use_sim_time": use_sim_time}
    map_over = {"use_sim_time": use_sim_time}
    if cfg["model"]:
        loc_over["model_path"] = map_over["model_path"] = cfg["model"]
    if cfg["map_file"]:
        map_over["map_file"] = cfg["map_file"]
    namespace = cfg["namespace"]
    # Where the nodes end up: launch_ros prefixes a relative ``namespace`` with the enclosing
    # PushROSNamespace's (the ``ros_namespace`` configuration); an absolute one stands alone.
    effective_ns = _effective_namespace(cfg.get("ros_namespace") or "", namespace)

    def params(name: str, over: dict) -> list:
        if effective_ns:
            return [_params_for(params_file, name, effective_ns), over]
        return [params_file, over]

    common = {
        "namespace": namespace,
        "output": "screen",
        "arguments": ["--ros-args", "--log-level", cfg["log_level"]],
    }
    nodes = [
        Node(package="dmn_ros", executable="localization_node", name="localization_node",
             parameters=params("localization_node", loc_over), **common),
    ]
    if cfg["start_mapping"].lower() in ("true", "1", "yes"):
        nodes.append(Node(package="dmn_ros", executable="mapping_node", name="mapping_node",
                          parameters=params("mapping_node", map_over), **common))
    if cfg["demo"].lower() in ("true", "1", "yes"):
        # With use_sim_time the simulator is the /clock source (its timers run on wall time), so it must publish it.
        sim_over = {"use_sim_time": use_sim_time, **({"publish_clock": True} if use_sim_time else {})}
        nodes.append(Node(package="dmn_ros", executable="sim_node", name="sim_node",
                          parameters=params("sim_node", sim_over), **common))
    return nodes


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("dmn_ros")
    default_params = os.path.join(share, "config", "dmn_localize.yaml")
    args = [
        DeclareLaunchArgument("namespace", default_value="", description="namespace of all nodes"),
        DeclareLaunchArgument("params_file", default_value=default_params, description="ROS 2 parameters YAML"),
        DeclareLaunchArgument("model", default_value="", description="exported model (.pt); empty: YAML/shipped"),
        DeclareLaunchArgument("map_file", default_value="", description="view-embedding map (.safetensors)"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="use /clock (with demo: sim_node publishes it)"),
        DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error"),
        DeclareLaunchArgument("start_mapping", default_value="true", description="start mapping_node"),
        DeclareLaunchArgument("demo", default_value="false", description="add sim_node (simulated maze robot)"),
    ]
    return LaunchDescription([*args, OpaqueFunction(function=_nodes)])
