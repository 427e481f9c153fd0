"""Process lifecycle of the entry points, each in its own process as a user starts it: SIGTERM and
SIGINT stop them cleanly (exit 0, worker processes reaped, none of rclpy's unretrieved-exception
or Destroyable messages), a process whose node died exits non-zero, and the policy node starts its
inference worker from a script without an ``if __name__ == "__main__":`` guard (what ``ros2 run``
generates). No wall-clock limits are asserted: the stop times are printed for the record."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from waiting import wait_for

pytestmark = pytest.mark.ros

BAD_SHUTDOWN = ("never retrieved", "Destroyable", "Traceback")


class Process:
    """A child Python process whose stderr is collected as it runs."""

    def __init__(self, args, cwd=None):
        env = dict(os.environ, ROS_DOMAIN_ID=os.environ.get("ROS_DOMAIN_ID", str(20 + os.getpid() % 80)),
                   ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, cwd=cwd)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self):
        return "".join(self.lines)

    def children(self):
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self, sig, timeout=60.0):
        started = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._reader.join(10.0)
        print(f"{signal.Signals(sig).name}: exited {code} after {time.monotonic() - started:.2f} s "
              f"(machine possibly loaded)")
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie waiting for init counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].startswith("Z")
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_policy_node_script_without_main_guard_stops_cleanly(model_dir, tmp_path, sig):
    script = tmp_path / "policy_node"  # as ros2 run's generated script: entry point called unguarded
    script.write_text("import sys\nfrom smp_ros.nodes.policy_node import main\nsys.exit(main())\n")
    proc = Process([str(script), "--ros-args", "-p", f"model:={model_dir}", "-p", "backend:=eager",
                    "-p", "device:=cpu", "-p", "threads:=1", "-p", "inference_process:=true",
                    "-p", "arm_status_topic:=''"])
    try:
        wait_for(lambda: "active: task" in proc.output or proc.proc.poll() is not None, timeout=300.0,
                 what="the policy node to activate")
        assert proc.proc.poll() is None, proc.output[-3000:]
        workers = proc.children()
        assert len(workers) == 1, f"expected one inference worker, got {workers}"
        assert proc.stop(sig) == 0, proc.output[-3000:]
        wait_for(lambda: _gone(workers[0]), timeout=10.0, what="the worker process to end")
        assert not any(bad in proc.output for bad in BAD_SHUTDOWN), proc.output[-3000:]
        assert proc.output.count("active: task") == 1  # the worker did not start a second node
    finally:
        proc.kill()


def test_a_process_whose_node_died_exits_nonzero(tmp_path):
    script = tmp_path / "dying_node"
    script.write_text(
        "import sys\n"
        "from rclpy.node import Node\n"
        "from smp_ros.nodes.ros_util import GuardedNode, run\n"
        "class Dying(GuardedNode, Node):\n"
        "    def __init__(self):\n"
        "        super().__init__('dying')\n"
        "        self.create_timer(0.2, self._tick)\n"
        "        self.n = 0\n"
        "    def _tick(self):\n"
        "        self.n += 1\n"
        "        if self.n == 2:\n"
        "            raise KeyError('a bug: contained, the node keeps running')\n"
        "        if self.n == 5:\n"
        "            self.fatal_error = 'its worker thread died'\n"
        "sys.exit(run(Dying))\n")
    proc = Process([str(script)])
    try:
        assert proc.proc.wait(120) == 1, proc.output[-3000:]
        proc._reader.join(10.0)
        assert "KeyError" in proc.output and "its worker thread died" in proc.output
    finally:
        proc.kill()


@pytest.mark.sim
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_bringup_stops_cleanly_on_a_signal(model_dir, tmp_path, sig):
    import yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = yaml.safe_load(open(os.path.join(root, "config", "bimanual.yaml")))
    config["/smp/policy"]["ros__parameters"].update({"model": str(model_dir), "backend": "eager", "device": "cpu",
                                                     "threads": 1, "inference_process": True})
    config["/sim"]["ros__parameters"]["sim"].update({"image_size": [32, 32], "cameras": ["cam_high"]})
    path = tmp_path / "bimanual.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = Process(["-m", "smp_ros.cli", "bringup", "--config", str(path), "--sim"], cwd=root)
    try:
        wait_for(lambda: "active: task" in proc.output or proc.proc.poll() is not None, timeout=300.0,
                 what="bringup to activate the policy")
        assert proc.proc.poll() is None, proc.output[-3000:]
        workers = proc.children()
        assert proc.stop(sig) == 0, proc.output[-3000:]
        for pid in workers:
            wait_for(lambda: _gone(pid), timeout=10.0, what=f"child {pid} to end")
        assert not any(bad in proc.output for bad in BAD_SHUTDOWN), proc.output[-3000:]
    finally:
        proc.kill()


@pytest.mark.sim
def test_demo_stopped_mid_episode_exits_cleanly(tmp_path):
    """`smp-ros demo` interrupted before its episode ends: exit 0, says no results were written, and
    an older results.json in --out is not passed off as this run's."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "demo"
    out.mkdir()
    (out / "results.json").write_text("{}")  # left by an earlier run
    proc = Process(["-m", "smp_ros.cli", "demo", "--task", "pen_cap", "--episodes", "1", "--out", str(out)], cwd=root)
    try:
        wait_for(lambda: "active: task" in proc.output or proc.proc.poll() is not None, timeout=300.0,
                 what="the demo to activate the policy")
        assert proc.proc.poll() is None, proc.output[-3000:]
        workers = proc.children()
        assert proc.stop(signal.SIGINT) == 0, proc.output[-3000:]
        for pid in workers:
            wait_for(lambda: _gone(pid), timeout=10.0, what=f"child {pid} to end")
        assert "stopped before the episodes finished" in proc.output
        assert not any(bad in proc.output for bad in BAD_SHUTDOWN), proc.output[-3000:]
        assert not (out / "results.json").exists()
    finally:
        proc.kill()


@pytest.mark.slow
@pytest.mark.sim
def test_fault_matrix_passes_in_the_simulated_system(tmp_path):
    """Every fault of the checklist in the running system (tools/fault_matrix.sh), in its own process."""
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "fault_matrix.json"
    proc = Process(["-m", "smp_ros.nodes.fault_matrix", "--json", str(out)], cwd=root)
    try:
        code = proc.proc.wait(1800)
        proc._reader.join(10.0)
        rows = json.loads(out.read_text())
        failed = [r for r in rows if not r["ok"]]
        assert code == 0 and not failed, f"{failed}\n{proc.output[-3000:]}"
        assert len(rows) >= 12
    finally:
        proc.kill()
