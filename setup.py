"""ament_python package that also installs with plain ``pip install -e .``."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "dmn_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.py")),
        (f"share/{PACKAGE}/config", glob("config/*")),
        (f"share/{PACKAGE}/models", glob("models/*")),
    ],
    package_data={PACKAGE: ["py.typed"]},
    include_package_data=True,
    python_requires=">=3.10",
    # torch is a range that the pinned CPU wheel satisfies; the Makefile installs the
    # pin first so pip never pulls a multi-GB CUDA build unless the user asks for it.
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "pyyaml>=6",
        "opencv-python-headless>=4.8",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
        "rosbags>=0.10",
    ],
    extras_require={
        # Users with a system ROS 2 skip this extra so they never get a second rclpy.
        "ros": [
            "ros-kilted-rclpy",
            "ros-kilted-rmw-fastrtps-cpp",
            "ros-kilted-sensor-msgs",
            "ros-kilted-geometry-msgs",
            "ros-kilted-nav-msgs",
            "ros-kilted-visualization-msgs",
            "ros-kilted-std-srvs",
            "ros-kilted-diagnostic-msgs",
        ],
        "sim": ["mujoco>=3.17,<4", "labmaze==1.0.6"],
        "dev": ["pytest>=7", "pytest-timeout", "ruff>=0.5", "hypothesis>=6"],
    },
    zip_safe=True,
    maintainer="dmn_ros maintainers",
    maintainer_email="dmn-ros@example.com",
    description="Differentiable Mapping Network visual localization for ROS 2",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "dmn-demo = dmn_ros.demo:main",
            "dmn-world = dmn_ros.worlds.cli:main",
            "dmn-dataset = dmn_ros.data.cli:main",
            "dmn-train = dmn_ros.training.cli:main",
            "dmn-eval = dmn_ros.evaluation.cli:main",
            "dmn-export = dmn_ros.training.export_cli:main",
            "dmn-bag-record = dmn_ros.bags.record:main",
            "dmn-bag-eval = dmn_ros.bags.evaluate:main",
            "dmn-bag-play = dmn_ros.bags.play:main",
            "mapping_node = dmn_ros.ros.mapping_node:main",
            "localization_node = dmn_ros.ros.localization_node:main",
            "sim_node = dmn_ros.ros.sim_node:main",
        ],
    },
)
