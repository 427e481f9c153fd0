"""The package as a ROS 2 user runs it after an install, not from the source tree.

The executables are installed the way ``make venv`` does (``python -m smp_ros.install``) into a
fresh prefix, as the script colcon's CMakeLists.txt generates (module-level ``sys.exit(main())``,
no ``__main__`` guard), and started exactly as ``ros2 run smp_ros <exe> --ros-args --params-file
... -p ...`` starts them: the script as a subprocess, from a working directory outside the source
tree, with ``AMENT_PREFIX_PATH`` naming the prefix (what sourcing a setup script does). The
README's "On a ROS 2 install" section lists the same commands.

What is not covered here: ``ros2 launch`` / ``ros2 run`` themselves (launch, launch_ros and
ros2cli are not on PyPI); test_launch.py generates the launch descriptions' node actions instead.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smp_ros.install import EXECUTABLES, install, script_text
from smp_ros.resources import ResourceNotFound, resolve

ROOT = Path(__file__).resolve().parent.parent
STOP_TIMEOUT_S = 60.0  # generous: a loaded 2-core machine; the measured time is printed

os.environ.setdefault("ROS_DOMAIN_ID", str(20 + os.getpid() % 80))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


# ------------------------------------------------------------------ install layout (no ROS)

def test_colcon_and_venv_install_the_same_executables_with_the_same_script():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    listed = dict(re.findall(r'"(\w+)=([\w.]+)"', cmake))
    assert listed == EXECUTABLES
    content = re.search(r'CONTENT "([^"]*)"', cmake).group(1)
    generated = content.replace("\\n", "\n").replace("${_module}", "smp_ros.nodes.policy_node")
    assert generated == script_text("smp_ros.nodes.policy_node")
    assert re.search(r"install\(DIRECTORY launch config models DESTINATION share/", cmake)


def test_install_links_share_files_and_writes_runnable_scripts_idempotently(tmp_path):
    install(tmp_path, sys.executable)
    install(tmp_path, sys.executable)  # again: nothing breaks, nothing duplicates
    share = tmp_path / "share" / "smp_ros"
    assert (share / "launch" / "bimanual.launch.py").is_file()
    assert (share / "config" / "bimanual.yaml").is_file()
    assert (share / "models" / "smp_sim" / "manifest.json").is_file()
    assert (tmp_path / "share" / "ament_index" / "resource_index" / "packages" / "smp_ros").is_file()
    for name, module in EXECUTABLES.items():
        script = tmp_path / "lib" / "smp_ros" / name
        assert os.access(script, os.X_OK)
        assert script.read_text() == script_text(module, sys.executable)


def test_relative_paths_resolve_in_the_working_directory_first_then_the_share_directory(tmp_path, monkeypatch):
    prefix, elsewhere = tmp_path / "prefix", tmp_path / "elsewhere"
    install(prefix, sys.executable)
    elsewhere.mkdir()
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(prefix))
    monkeypatch.chdir(elsewhere)
    assert resolve("models/smp_sim", "model") == (ROOT / "models" / "smp_sim").resolve()  # via share/
    local = elsewhere / "models" / "smp_sim"
    local.mkdir(parents=True)
    assert resolve("models/smp_sim", "model") == local.resolve()  # the working directory wins
    with pytest.raises(ResourceNotFound) as error:
        resolve("models/none", "model")
    message = str(error.value)
    assert "model 'models/none'" in message
    assert str(elsewhere / "models" / "none") in message and str(prefix / "share" / "smp_ros") in message
    with pytest.raises(ResourceNotFound, match="does not exist"):
        resolve(tmp_path / "absent", "model")


def test_command_line_parameters_are_parsed_from_the_ros_args_sections():
    from smp_ros.nodes.ros_util import cli_parameter_overrides

    overrides = cli_parameter_overrides(
        ["prog", "-p", "ignored:=1", "--ros-args", "--params-file", "x.yaml", "-p", "backend:=eager",
         "--param", "camera_size:=[48, 64]", "-p", "backend:=compiled", "-p", "policy:seed:=3",
         "-r", "a:=b", "--", "-p", "after:=1", "--ros-args", "-p", "inference_process:=true"])
    values = {p.name: p.value for p in overrides}
    assert values == {"backend": "compiled", "camera_size": [48, 64], "inference_process": True}


# ------------------------------------------------------------------ executables as ros2 run starts them


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    path = tmp_path_factory.mktemp("install")
    install(path, sys.executable)
    return path


class Started:
    """One executable started as ``ros2 run`` does, its output in a file."""

    def __init__(self, prefix: Path, cwd: Path, name: str, *args: str) -> None:
        env = dict(os.environ, AMENT_PREFIX_PATH=str(prefix), PYTHONUNBUFFERED="1")
        self.log_path = cwd / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(prefix / "lib" / "smp_ros" / name), *args], cwd=cwd, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def interrupt(self) -> tuple[int, float]:
        """SIGINT (Ctrl-C); the exit status and the seconds it took."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"did not stop within {STOP_TIMEOUT_S:g} s of SIGINT:\n{self.output()[-3000:]}")
        return rc, time.monotonic() - start

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def ros_client():
    import rclpy

    rclpy.init()
    node = rclpy.create_node("installed_test_client")
    yield node
    node.destroy_node()
    rclpy.try_shutdown()


def call(node, srv_type, name: str, request, started: Started, timeout: float = 120.0):
    import rclpy

    client = node.create_client(srv_type, name)
    try:
        deadline = time.monotonic() + timeout
        while not client.wait_for_service(timeout_sec=0.2):
            assert started.alive(), f"exited with {started.proc.returncode}:\n{started.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no service {name} after {timeout:g} s:\n{started.output()[-3000:]}"
        future = client.call_async(request)
        rclpy.spin_until_future_complete(node, future, timeout_sec=max(1.0, deadline - time.monotonic()))
        assert future.done(), f"{name}: no response"
        return future.result()
    finally:
        node.destroy_client(client)


def parameters(node, fqn: str, names: list[str], started: Started) -> dict:
    from rcl_interfaces.srv import GetParameters
    from rclpy.parameter import parameter_value_to_python

    response = call(node, GetParameters, f"{fqn}/get_parameters", GetParameters.Request(names=names), started)
    return dict(zip(names, (parameter_value_to_python(v) for v in response.values)))


@pytest.mark.ros
def test_policy_node_with_the_inference_worker_runs_as_ros2_run_starts_it(prefix, tmp_path, ros_client):
    """ros2 run smp_ros policy_node --ros-args --params-file <share>/config/bimanual.yaml
    -p backend:=eager -p inference_process:=true -p device:=cpu, from a directory without models/."""
    from lifecycle_msgs.srv import GetState

    config = prefix / "share" / "smp_ros" / "config" / "bimanual.yaml"
    started = Started(prefix, tmp_path, "policy_node", "--ros-args", "--params-file", str(config),
                      "-p", "backend:=eager", "-p", "inference_process:=true", "-p", "device:=cpu")
    try:
        # Configure (model load, worker start, warm-up) runs in the node's callbacks and the lifecycle
        # services wait behind it, so the log line comes first; then the state is asked.
        deadline = time.monotonic() + 400.0  # generous: a busy 2-core machine
        while "] [smp.policy]: active:" not in started.output():
            assert started.alive(), f"policy_node exited:\n{started.output()[-3000:]}"
            assert time.monotonic() < deadline, f"policy never active:\n{started.output()[-3000:]}"
            time.sleep(0.5)
        state = call(ros_client, GetState, "/smp/policy/get_state", GetState.Request(), started).current_state
        assert state.label == "active"
        # The command line beat the file's node-specific `backend: compiled`.
        assert parameters(ros_client, "/smp/policy", ["backend", "inference_process", "model"], started) == {
            "backend": "eager", "inference_process": True, "model": "models/smp_sim"}
        assert "(eager, cpu)" in started.output()
        workers = [pid for pid in children(started.proc.pid) if alive(pid)]
        assert workers, "no inference worker process under the policy node"
        rc, seconds = started.interrupt()
        print(f"policy_node with worker: stopped {seconds:.2f} s after SIGINT")
        assert rc == 0, started.output()[-3000:]
        assert not [pid for pid in workers if alive(pid)], "the inference worker outlived the node"
        assert "Traceback" not in started.output() and "terminate called" not in started.output()
    finally:
        started.close()


@pytest.mark.ros
@pytest.mark.sim
def test_sim_node_runs_as_ros2_run_starts_it(prefix, tmp_path, ros_client):
    from sensor_msgs.msg import JointState

    from smp_ros.nodes.ros_util import SENSOR_QOS

    config = prefix / "share" / "smp_ros" / "config" / "bimanual.yaml"
    started = Started(prefix, tmp_path, "sim_node", "--ros-args", "--params-file", str(config),
                      "-p", "seed:=7", "-p", "task:=handover", "-p", "sim.image_size:=[48,64]")
    received = []
    ros_client.create_subscription(JointState, "/left/joint_states", received.append, SENSOR_QOS)
    try:
        import rclpy

        deadline = time.monotonic() + 180.0
        while len(received) < 5:
            rclpy.spin_once(ros_client, timeout_sec=0.1)
            assert started.alive(), f"sim_node exited:\n{started.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no joint states:\n{started.output()[-3000:]}"
        # -p beats the file's /sim block (task: pen_cap, seed: 0).
        assert parameters(ros_client, "/sim", ["seed", "task", "sim.image_size"], started) == {
            "seed": 7, "task": "handover", "sim.image_size": [48, 64]}
        rc, seconds = started.interrupt()
        print(f"sim_node: stopped {seconds:.2f} s after SIGINT")
        assert rc == 0, started.output()[-3000:]
        assert "Traceback" not in started.output(), started.output()[-3000:]
    finally:
        started.close()


@pytest.mark.ros
def test_record_runs_as_ros2_run_starts_it(prefix, tmp_path):
    """record takes its own options before --ros-args (argparse never sees the ROS arguments)."""
    from rosbags.rosbag2 import Reader

    bag = tmp_path / "bag"
    started = Started(prefix, tmp_path, "record", "--out", str(bag), "--cameras", "cam_high",
                      "--ros-args", "-p", "use_sim_time:=false")
    try:
        deadline = time.monotonic() + 120.0
        while "recording" not in started.output():  # the recorder's start-up line
            assert started.alive(), f"record exited:\n{started.output()[-3000:]}"
            assert time.monotonic() < deadline, f"record never started:\n{started.output()[-3000:]}"
            time.sleep(0.2)
        rc, seconds = started.interrupt()
        print(f"record: stopped {seconds:.2f} s after SIGINT")
        assert rc == 0, started.output()[-3000:]
        assert f"wrote {bag}" in started.output()
        with Reader(bag) as reader:  # a readable bag (nothing was published)
            assert reader.message_count == 0
    finally:
        started.close()


CONFIG = "{share}/config/bimanual.yaml"


@pytest.mark.ros
@pytest.mark.parametrize("name,args,ready,exit_status,expected", [
    # No PiPER answers on this (virtual) bus: the driver still comes up (arm_status reports the arm)
    # with the command line's channel and bus over the file's can_left / socketcan.
    ("driver_node", ["--ros-args", "-r", "__ns:=/left", "--params-file", CONFIG, "-p", "bus_type:=virtual",
                     "-p", "can_channel:=nobody", "-p", "enable_on_start:=false"], True, 0,
     "left arm on nobody (virtual)"),
    # A camera source that does not exist: named, exit 1.
    ("camera_node", ["--ros-args", "-r", "__ns:=/cameras/cam_high", "-p", "source:=/nonexistent.avi"], False, 1,
     "/nonexistent.avi"),
    ("train_node", ["--help"], False, 0, "usage"),
    ("bringup", ["--help", "--ros-args", "-p", "x:=1"], False, 0, "usage"),
])
def test_every_other_executable_starts_from_its_script(prefix, tmp_path, name, args, ready, exit_status, expected):
    args = [a.format(share=prefix / "share" / "smp_ros") for a in args]
    started = Started(prefix, tmp_path, name, *args)
    try:
        if ready:
            deadline = time.monotonic() + 120.0
            while expected not in started.output():
                assert started.alive(), f"{name} exited:\n{started.output()[-3000:]}"
                assert time.monotonic() < deadline, f"{name}: no {expected!r}:\n{started.output()[-3000:]}"
                time.sleep(0.2)
            rc, seconds = started.interrupt()
            print(f"{name}: stopped {seconds:.2f} s after SIGINT")
        else:
            rc = started.proc.wait(timeout=120.0)
        output = started.output()
        assert rc == exit_status, output[-3000:]
        assert expected in output and "Traceback" not in output, output[-3000:]
    finally:
        started.close()
