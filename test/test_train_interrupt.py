"""`smp-ros train` stopped by SIGINT or SIGTERM in its own process: exit status 130, a message that
says how to resume, no traceback, and the state saved before the signal is still there."""

import signal
import subprocess
import sys
import threading

import pytest
from waiting import wait_for

from smp_ros import cli


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    out = tmp_path_factory.mktemp("interrupt") / "demos"
    assert cli.main(["sim-demos", "--task", "pen_cap", "--episodes", "2", "--out", str(out), "--episode-steps", "30",
                     "--no-only-success", "--backend", "direct"]) == 0
    return out


@pytest.mark.sim
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_train_stops_cleanly_on_a_signal(demos, tmp_path, sig):
    model = tmp_path / "model"
    # checkpoint_every of the tiny preset is 100: a state exists before the signal.
    proc = subprocess.Popen([sys.executable, "-m", "smp_ros.cli", "train", "--data", str(demos), "--preset", "tiny",
                             "--steps", "1000000", "--out", str(model), "--device", "cpu", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    state = model.with_name("model.train") / "state.pt"
    try:
        wait_for(lambda: state.is_file() or proc.poll() is not None, timeout=600.0, what="a saved training state")
        assert proc.poll() is None, "".join(lines)[-3000:]
        proc.send_signal(sig)
        assert proc.wait(120) == 130, "".join(lines)[-3000:]
        reader.join(10.0)
        output = "".join(lines)
        assert "interrupted; the same command resumes" in output and str(state.parent) in output
        assert "Traceback" not in output, output[-3000:]
        assert state.is_file()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
