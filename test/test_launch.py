"""The launch file and YAML name only things that exist, and the YAML covers every declared parameter.

``launch`` is not importable here, so the launch file is parsed with ``ast``.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dmn_ros.ros import params

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch" / "dmn_localize.launch.py"
YAML = ROOT / "config" / "dmn_localize.yaml"
TABLES = {"mapping_node": params.MAPPING, "localization_node": params.LOCALIZATION, "sim_node": params.SIM}


def _console_scripts() -> set[str]:
    text = (ROOT / "setup.py").read_text()
    return set(re.findall(r'"\s*([\w-]+)\s*=\s*[\w.]+:\w+"', text))


def _call_kwargs(tree: ast.AST, func: str) -> list[dict[str, object]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == func:
            kw = {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}
            if func == "DeclareLaunchArgument" and node.args and isinstance(node.args[0], ast.Constant):
                kw["name"] = node.args[0].value
            out.append(kw)
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _node_params(doc: dict, node: str) -> dict[str, object]:
    merged = _flatten(doc.get("/**", {}).get("ros__parameters", {}))
    merged.update(_flatten(doc.get(node, {}).get("ros__parameters", {})))
    return merged


def test_launch_file_parses_and_names_existing_things():
    tree = ast.parse(LAUNCH.read_text())
    nodes = _call_kwargs(tree, "Node")
    executables = {n["executable"] for n in nodes}
    assert executables == {"localization_node", "mapping_node", "sim_node"}
    assert executables <= _console_scripts()
    assert all(n["package"] == "dmn_ros" for n in nodes)
    assert {n["name"] for n in nodes} == set(TABLES)
    for n in nodes:  # each node name has a section in the YAML
        assert n["name"] in yaml.safe_load(YAML.read_text())
    args = {a["name"] for a in _call_kwargs(tree, "DeclareLaunchArgument")}
    assert args == {"namespace", "params_file", "model", "map_file", "use_sim_time", "log_level",
                    "start_mapping", "demo"}
    # Files it names exist in the source tree (and setup.py installs config/* and launch/*).
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert "config" in strings and "dmn_localize.yaml" in strings
    assert YAML.is_file() and (ROOT / "config" / "dmn_localize.rviz").is_file()
    setup = (ROOT / "setup.py").read_text()
    assert 'glob("config/*")' in setup and 'glob("launch/*.py")' in setup
    assert (ROOT / "package.xml").is_file() and (ROOT / "resource" / "dmn_ros").is_file()



def _launched_nodes(monkeypatch, **args: str) -> dict[str, list]:
    """Run the launch file's node builder with stand-ins for launch / launch_ros (not installable here):
    node name -> its ``parameters`` list, for the launch arguments ``args`` over the declared defaults."""
    import importlib.util
    import sys
    import types

    class Recorded:
        def __init__(self, *a, **kw):
            self.args, self.kwargs = a, kw

    stubs = {"launch": types.ModuleType("launch"), "launch.actions": types.ModuleType("launch.actions"),
             "launch_ros": types.ModuleType("launch_ros"), "launch_ros.actions": types.ModuleType("launch_ros.actions"),
             "ament_index_python": types.ModuleType("ament_index_python"),
             "ament_index_python.packages": types.ModuleType("ament_index_python.packages")}
    stubs["launch"].LaunchDescription = Recorded
    stubs["launch.actions"].DeclareLaunchArgument = stubs["launch.actions"].OpaqueFunction = Recorded
    stubs["launch_ros.actions"].Node = Recorded
    stubs["ament_index_python.packages"].get_package_share_directory = lambda _pkg: str(ROOT)
    for name, mod in stubs.items():
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("dmn_localize_launch", LAUNCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    declared = {a.args[0]: a.kwargs["default_value"] for a in mod.generate_launch_description().args[0]
                if isinstance(a, Recorded) and a.args}
    context = types.SimpleNamespace(launch_configurations={**declared, **args})
    return {n.kwargs["name"]: n.kwargs["parameters"] for n in mod._nodes(context)}


@pytest.mark.parametrize("namespace", ["", "robot1"])
def test_demo_with_sim_time_makes_sim_node_publish_clock(monkeypatch, namespace):
    """sim_node is the only /clock source of ``demo:=true``: with use_sim_time it must publish /clock."""
    def merged(nodes: dict[str, list], name: str) -> dict:
        out: dict = {}
        for p in nodes[name]:  # the file's section of the node (or the namespaced dict), then the overrides
            out.update(_node_params(yaml.safe_load(Path(p).read_text()), name) if isinstance(p, str) else p)
        return out

    nodes = _launched_nodes(monkeypatch, demo="true", use_sim_time="true", namespace=namespace)
    sim = merged(nodes, "sim_node")
    assert sim["use_sim_time"] is True and sim["publish_clock"] is True
    assert merged(nodes, "localization_node")["use_sim_time"] is True
    assert merged(nodes, "mapping_node")["use_sim_time"] is True
    sim = merged(_launched_nodes(monkeypatch, demo="true", namespace=namespace), "sim_node")
    assert sim["use_sim_time"] is False and sim["publish_clock"] is False  # the YAML's value

def _rcl_params(parameters: list, fqn: str) -> dict:
    """What a node named ``fqn`` gets from a launch ``parameters`` list, matched as rcl matches YAML node keys:
    a key without a leading ``/`` is absolute (``mapping_node`` is ``/mapping_node``), ``/**`` any namespaces,
    ``*`` one name. Dicts apply as they are (launch_ros writes them under the node's own name)."""
    out: dict = {}
    for p in parameters:
        if not isinstance(p, str):
            out.update(p)
            continue
        for key, section in (yaml.safe_load(Path(p).read_text()) or {}).items():
            key = key if key.startswith("/") else "/" + key
            pattern = re.escape(key).replace(r"/\*\*", "(/[^/]+)*").replace(r"\*", "[^/]+")
            if re.fullmatch(pattern, fqn):
                out.update(_flatten((section or {}).get("ros__parameters") or {}))
    return out


@pytest.mark.parametrize(("ros_namespace", "namespace", "node_ns"), [
    (None, "", ""),  # not namespaced: the file as it is
    (None, "robot1", "/robot1"),  # namespace:=robot1
    ("/robot1", "", "/robot1"),  # included under PushROSNamespace('robot1'), the usual fleet launch
    ("/fleet", "robot1", "/fleet/robot1"),  # both: launch_ros prefixes the relative namespace
    ("/fleet", "/robot1", "/robot1"),  # an absolute namespace ignores the enclosing one
])
def test_namespaced_nodes_get_their_yaml_sections(monkeypatch, tmp_path, ros_namespace, namespace, node_ns):
    """Wherever the nodes end up, each gets its plain ``<node>:`` section, ``/**`` and its own full-name section;
    rcl would apply a plain ``mapping_node:`` only to ``/mapping_node``."""
    fleet = tmp_path / "fleet.yaml"
    doc = {
        "/**": {"ros__parameters": {"device": "cpu"}},
        "mapping_node": {"ros__parameters": {"share_contexts": True, "max_contexts": 7}},
        "localization_node": {"ros__parameters": {"max_particles": 99, "health": {"lost_ratio": 0.1}}},
    }
    if node_ns:  # a per-robot section (docs/multirobot.md); in the root namespace it is the plain one
        doc[f"{node_ns}/mapping_node"] = {"ros__parameters": {"max_contexts": 8}}
    fleet.write_text(yaml.safe_dump(doc, sort_keys=False))
    args = {"params_file": str(fleet), "namespace": namespace}
    if ros_namespace is not None:
        args["ros_namespace"] = ros_namespace
    nodes = _launched_nodes(monkeypatch, **args)
    mapping = _rcl_params(nodes["mapping_node"], f"{node_ns}/mapping_node")
    assert mapping["share_contexts"] is True and mapping["device"] == "cpu"
    assert mapping["max_contexts"] == (8 if node_ns else 7)  # the node's full-name section wins over the plain one
    loc = _rcl_params(nodes["localization_node"], f"{node_ns}/localization_node")
    assert loc["max_particles"] == 99 and loc["health.lost_ratio"] == 0.1 and loc["device"] == "cpu"
    assert loc["use_sim_time"] is False  # the launch argument's override


def test_yaml_covers_every_declared_parameter_and_nothing_else():
    doc = yaml.safe_load(YAML.read_text())
    assert set(_flatten(doc["/**"]["ros__parameters"])) <= set(params.COMMON) | {"use_sim_time"}
    for node, table in TABLES.items():
        values = _node_params(doc, node)
        missing = set(table) - set(values)
        assert not missing, f"{node}: parameters missing from the YAML: {sorted(missing)}"
        # Node sections name only that node's parameters; `/**` holds shared ones (sim_node ignores those).
        own = set(_flatten(doc.get(node, {}).get("ros__parameters", {})))
        unknown = own - set(table) - {"use_sim_time"}
        assert not unknown, f"{node}: YAML names undeclared parameters: {sorted(unknown)}"
        for name, (default, _doc) in table.items():  # same type as the declared default
            v = values[name]
            if isinstance(default, float):
                assert isinstance(v, (int, float)) and not isinstance(v, bool), (node, name)
            else:
                assert type(v) is type(default), (node, name, v)


def test_nodes_declare_exactly_their_table():
    """Node modules declare parameters only through params.declare with their table."""
    for mod, table in (("mapping_node", "MAPPING"), ("localization_node", "LOCALIZATION"), ("sim_node", "SIM")):
        src = (ROOT / "dmn_ros" / "ros" / f"{mod}.py").read_text()
        assert f"params.declare(self, params.{table})" in src
        assert src.count("declare_parameter") == 0


def test_rviz_config_shows_required_topics():
    rviz = yaml.safe_load((ROOT / "config" / "dmn_localize.rviz").read_text())
    topics = {d["Topic"]["Value"] for d in rviz["Visualization Manager"]["Displays"] if "Topic" in d}
    assert {"/camera/image", "/particle_cloud", "/dmn_markers", "/dmn_pose", "/dmn_map"} <= topics


def test_demo_without_model_fails_clearly(tmp_path, capsys):
    from dmn_ros.demo import main

    assert main(["--model", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "no trained model" in capsys.readouterr().err


def test_demo_runs_in_the_world_family_the_model_was_trained_for(tmp_path, capsys):
    """A rooms model is demonstrated in rooms; ``--domain`` overrides. Real nodes over DDS, one short episode."""
    from dmn_ros.demo import main
    from dmn_ros.export import export_model
    from dmn_ros.model import DMN

    model = tmp_path / "rooms.pt"
    export_model(DMN(), model, meters_per_unit=20.0, training={"domain": "rooms"})
    args = ["--model", str(model), "--episodes", "1", "--steps", "1", "--particles", "64", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "global localization in rooms worlds" in out and "success rate" in out
    assert "converged at t=1: 0 of 1 episodes" in out  # converged needs 3 concentrated updates (health.md)
    assert list((tmp_path / "o").glob("episode_00_world_*.png"))
    assert main([*args, "--domain", "maze"]) == 0
    assert "global localization in maze worlds" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_setup_for_a_system_ros_install(tmp_path):
    """The system-ROS recipe of the README: that Python, a venv that sees the system's rclpy, one stamp per extras."""
    def dry_run(*args: str) -> str:
        return subprocess.run(["make", "-n", "-C", str(ROOT), "setup", f"VENV={tmp_path / 'venv'}", *args],
                              capture_output=True, text=True, check=True).stdout

    system = dry_run("PYTHON=/usr/bin/python3", "VENV_FLAGS=--system-site-packages", "EXTRAS=sim,dev")
    assert f"/usr/bin/python3 -m venv --system-site-packages {tmp_path / 'venv'}" in system
    assert '-e ".[sim,dev]"' in system and "touch" in system
    full = dry_run()
    stamps = {re.search(r"touch (\S+)", out).group(1) for out in (system, full)}
    assert len(stamps) == 2  # other extras: another stamp, so make installs them
    assert "ros_sim_dev" in full and "--system-site-packages" not in full
    # Set up with sim,dev, a later plain `make demo` / `make test` keeps those extras (no ros wheels over rclpy).
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / ".dmn_ros_extras").write_text("sim,dev\n")
    again = dry_run()
    assert '-e ".[sim,dev]"' in again and "ros_sim_dev" not in again


def test_plain_pip_install_finds_its_share_files(tmp_path, monkeypatch):
    """``pip install .`` puts models/ and config/ in <prefix>/share/dmn_ros; they are found without an ament index."""
    import sys

    from dmn_ros.demo import default_params_file
    from dmn_ros.export import DEFAULT_MODEL_NAME, default_model_path

    share = tmp_path / "share" / "dmn_ros"
    (share / "models").mkdir(parents=True)
    (share / "config").mkdir()
    (share / "models" / DEFAULT_MODEL_NAME).write_bytes(b"model")
    (share / "config" / "dmn_localize.yaml").write_text("{}")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.delenv("DMN_ROS_MODEL", raising=False)
    monkeypatch.delenv("AMENT_PREFIX_PATH", raising=False)
    assert default_model_path() == share / "models" / DEFAULT_MODEL_NAME
    assert default_params_file() == share / "config" / "dmn_localize.yaml"
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "elsewhere"))  # not installed there: the source tree's
    assert default_model_path() == ROOT / "models" / DEFAULT_MODEL_NAME
    assert default_params_file() == ROOT / "config" / "dmn_localize.yaml"


def test_robot_install_covers_every_runtime_dependency():
    """colcon users get each install_requires / sim package from rosdep (package.xml) or the README's pip line."""
    keys = set(re.findall(r"<exec_depend>([\w-]+)</exec_depend>", (ROOT / "package.xml").read_text()))
    readme = (ROOT / "README.md").read_text()
    robot = readme[readme.index("## Running on a robot"):]
    pip_line = next(ln for ln in robot.splitlines() if ln.startswith("pip install"))
    setup = (ROOT / "setup.py").read_text()
    requires = re.findall(r'"([A-Za-z][\w-]*)[<>=!\s\d.,]*"(?!\s*:)',  # the packages, not the extras' names
                          setup[setup.index("install_requires"):setup.index('"dev"')])
    alias = {"pyyaml": "yaml", "opencv-python-headless": "opencv"}
    for pkg in (r for r in requires if not r.startswith("ros-")):
        name = alias.get(pkg, pkg)
        assert {f"python3-{name}", f"python3-{name}-pip"} & keys or pkg in pip_line, pkg


def test_package_xml_declares_what_the_code_and_tests_import():
    """rosdep installs what the nodes, the launch file, the renderer and ``colcon test`` need, by the right keys."""
    xml = (ROOT / "package.xml").read_text()
    exec_keys = set(re.findall(r"<exec_depend>([\w-]+)</exec_depend>", xml))
    test_keys = set(re.findall(r"<test_depend>([\w-]+)</test_depend>", xml))
    sources = [p.read_text() for p in [*(ROOT / "dmn_ros").rglob("*.py"), *(ROOT / "launch").glob("*.py")]]

    def imported(module: str) -> bool:
        return any(re.search(rf"^\s*(from|import) {module}\b", s, re.MULTILINE) for s in sources)

    # The Python tf2_ros module comes from tf2_ros_py; the tf2_ros key is the C++ package (no map->odom without it).
    assert imported("tf2_ros") and "tf2_ros_py" in exec_keys and "tf2_ros" not in exec_keys
    assert imported("ament_index_python") and "ament_index_python" in exec_keys
    # The worlds' renderer (demo:=true, sim_node) defaults to Mesa's off-screen GL.
    assert 'setdefault("MUJOCO_GL", "osmesa")' in (ROOT / "dmn_ros" / "worlds" / "renderer.py").read_text()
    assert "libosmesa6-dev" in exec_keys
    # colcon test: the dev extra's test tools (not the linter), nothing unused.
    setup = (ROOT / "setup.py").read_text()
    dev = re.findall(r'"([A-Za-z][\w-]*)[<>=!\d.,]*"', re.search(r'"dev":\s*\[([^\]]*)\]', setup).group(1))
    assert "hypothesis" in dev and "pytest-timeout" in dev
    assert test_keys == {f"python3-{p}" for p in dev if p != "ruff"}
