# smp_ros on ROS 2 Jazzy (Ubuntu 24.04, Python 3.12) with CUDA-capable PyTorch from PyPI.
#
#   docker build -t smp_ros .                                   # CUDA PyTorch, no TensorRT
#   docker build -t smp_ros:trt --build-arg EXTRAS=tensorrt .   # + Torch-TensorRT (needs NVIDIA's index)
#
# See docs/DOCKER.md for running it with GPUs, USB-CAN adapters and cameras.
FROM ros:jazzy

ARG EXTRAS=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/smp_ros/venv \
    MUJOCO_GL=egl \
    PYOPENGL_PLATFORM=egl

# ROS parts the wheels-only setup cannot have (launch, ros2 bag with MCAP, the maintained cv_bridge),
# offscreen rendering for the simulator, and CAN tools for the arms. Versions come from the ROS
# apt snapshot of the base image's tag; pinning single debs would break at every ROS sync.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3-venv python3-pip python3-opencv \
        ros-jazzy-launch-ros ros-jazzy-ros2bag ros-jazzy-rosbag2-storage-mcap ros-jazzy-cv-bridge \
        ros-jazzy-rmw-fastrtps-cpp \
        libegl1 libegl-mesa0 libgl1-mesa-dri libosmesa6 \
        can-utils iproute2 \
    && rm -rf /var/lib/apt/lists/*

# Python packages in a venv that also sees the system site-packages: rclpy and the message packages
# of /opt/ros/jazzy, and Ubuntu's numpy 1.26 and OpenCV, which those and cv_bridge were compiled
# against (numpy 2 from PyPI would break them, hence the constraint; wheels built against numpy 2
# run on 1.26). requirements.txt is filtered: its ROS 2 PyPI wheels (ros-*) and their build helpers
# stand in for /opt/ros on machines without ROS, and its numpy / OpenCV pins are numpy-2 builds.
WORKDIR /ws/src/smp_ros
COPY requirements.txt ./
RUN python3 -m venv --system-site-packages "$VIRTUAL_ENV" \
    && grep -vE '^(ros-|catkin-pkg|empy|lark-parser|numpy|opencv-python-headless)' requirements.txt > /tmp/requirements.txt \
    && echo "numpy<2" > /tmp/constraints.txt \
    && "$VIRTUAL_ENV/bin/pip" install -r /tmp/requirements.txt -c /tmp/constraints.txt
ENV PATH=$VIRTUAL_ENV/bin:$PATH

# Build the package (messages + Python package + executables) with colcon.
COPY . .
# An extra (tensorrt) is installed through pip for its dependencies only; colcon installs smp_ros.
RUN if [ -n "$EXTRAS" ]; then pip install ".[${EXTRAS}]" -c /tmp/constraints.txt && pip uninstall -y smp_ros; fi
WORKDIR /ws
RUN . /opt/ros/jazzy/setup.bash \
    && colcon build --packages-select smp_ros --cmake-args -DBUILD_TESTING=OFF \
        "-DPython3_EXECUTABLE=$VIRTUAL_ENV/bin/python" \
    && rm -rf build log

# Every shell and `docker run` command sees ROS and the package.
RUN printf 'source /opt/ros/jazzy/setup.bash\nsource /ws/install/setup.bash\n' >> /etc/bash.bashrc \
    && printf '#!/bin/bash\nset -e\nsource /opt/ros/jazzy/setup.bash\nsource /ws/install/setup.bash\nexec "$@"\n' \
        > /usr/local/bin/smp_ros_entrypoint \
    && chmod +x /usr/local/bin/smp_ros_entrypoint
ENTRYPOINT ["/usr/local/bin/smp_ros_entrypoint"]
CMD ["ros2", "launch", "smp_ros", "bimanual.launch.py", "use_sim:=true"]
