from pathlib import Path

from setuptools import find_packages, setup

package_name = "smp_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(include=["smp_ros", "smp_ros.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", ["launch/bimanual.launch.py", "launch/record.launch.py"]),
        ("share/" + package_name + "/config", sorted(str(p) for p in Path("config").glob("*.yaml"))),
    ] + [
        # The shipped model, found from share/smp_ros by a relative `model: models/smp_sim`.
        # (An editable install, `make venv`, links these instead: python -m smp_ros.install.)
        ("share/" + package_name + "/" + str(d), sorted(str(p) for p in d.iterdir() if p.is_file()))
        for d in sorted(Path("models").iterdir()) if d.is_dir()
    ],
    python_requires=">=3.11",
    install_requires=["setuptools"],
    extras_require={"tensorrt": ["torch-tensorrt==2.14.0"]},
    zip_safe=False,
    maintainer="smp_ros developers",
    maintainer_email="smp_ros@users.noreply.github.com",
    description="Skill Mixture-of-Experts diffusion Policy (SMP) for bimanual AgileX PiPER arms on ROS 2",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "smp-ros = smp_ros.cli:main",
        ],
    },
)
