"""smp_ros: the Skill Mixture-of-Experts diffusion Policy (SMP) for bimanual AgileX PiPER arms."""

import sys
from pathlib import Path

__version__ = "0.1.0"

# The generated message modules (smp_ros.msg, smp_ros.srv). A colcon install puts them inside this
# directory. Without a ROS install, tools/build_msgs.sh puts them in <prefix>/lib/smp_ros_interfaces,
# kept off sys.path so that they cannot shadow this package; extend the package path to reach them.
_interfaces = Path(sys.prefix) / "lib" / "smp_ros_interfaces" / __name__
if _interfaces.is_dir() and str(_interfaces) not in __path__:
    __path__.append(str(_interfaces))
del _interfaces
