"""Inference in a worker process, behind the same API as ``InferenceEngine``.

Why a process: PyTorch releases the GIL inside every operator and takes it back afterwards. In a
process whose other threads run Python continuously (the simulator, piper_sdk's CAN parsing, ROS
callbacks), every take-back can wait for a whole switch interval, and an eager inference is a few
thousand small operators: on 2 cores an 84 ms inference took 1-2 s inside the simulated bringup.
A worker process has its own interpreter and GIL. Observations and results cross a socket (about
0.2 MB per call for two 128x128 cameras over T_o = 2 steps), a fraction of a millisecond.

How the child starts: ``python -m smp_ros.runtime.worker FD`` through ``subprocess``, with one end
of a socket pair inherited as FD. Not ``multiprocessing``'s spawn or forkserver: those re-import
the parent's ``__main__`` in the child, and the scripts ``ros2 run`` generates call ``main()`` at
module level without an ``if __name__ == "__main__":`` guard, so the child would start a second
node (or fail with "before the current process has finished its bootstrapping phase"). Not fork
either: it would copy the parent's threads' locks mid-use. The child's only entry point is this
module, whatever started the parent.

Failures: a worker that exits (crash, OOM killer, SIGKILL) or stops answering for
``reply_timeout_s`` makes ``infer`` raise :class:`WorkerDiedError`; :meth:`EngineProcess.restart`
starts a fresh one (the policy runner does, with bounded retries and backoff). The child ignores
SIGINT (a Ctrl-C in a terminal reaches the whole process group; the parent decides when the
worker ends) and exits when the parent's end of the socket closes, so it never outlives its parent.

``runtime.inference_process: true`` makes the policy node use it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Mapping

import torch

from smp_ros.config import RuntimeConfig
from smp_ros.runtime.engine import InferenceEngine, InferenceResult

START_TIMEOUT_S = 600.0  # loading and warming up (compiling) a model on a slow CPU
REPLY_TIMEOUT_S = 60.0  # an inference not answered in this long means a hung worker
STOP_TIMEOUT_S = 0.5  # close(): how long the worker gets to exit by itself before SIGTERM, then SIGKILL


class InferenceWorkerError(RuntimeError):
    """The worker process failed to load the model or to run an inference; the message says why."""


class WorkerDiedError(InferenceWorkerError):
    """The worker process is gone (or hung and was killed); :meth:`EngineProcess.restart` replaces it."""


class EngineProcess:
    """``InferenceEngine(model, runtime, overrides=...)`` running in a child process.

    The child loads and warms the engine up before the constructor returns, so ``warmup()`` has
    nothing left to do. ``close()`` (or the parent's exit) ends it."""

    def __init__(self, model: str | Path, runtime: RuntimeConfig | None = None, *,
                 overrides: Mapping[str, Any] | None = None, start_timeout_s: float = START_TIMEOUT_S,
                 reply_timeout_s: float = REPLY_TIMEOUT_S) -> None:
        self.model_dir = Path(model)
        self._request = (str(model), runtime or RuntimeConfig(), dict(overrides or {}))
        self.start_timeout_s = start_timeout_s
        self.reply_timeout_s = reply_timeout_s
        self.restarts = 0
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._start()

    def _start(self) -> None:
        model = self._request[0]
        ours, theirs = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "smp_ros.runtime.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        try:
            self._conn.send(self._request)
            ready = self._conn.poll(self.start_timeout_s)
        except OSError:
            ready = True  # the child is gone: _receive reports how it ended
        if not ready:
            self.close()
            raise InferenceWorkerError(f"inference worker: {model} not loaded within {self.start_timeout_s:.0f} s")
        try:
            status, payload = self._receive()
        except WorkerDiedError as exc:
            self.close()
            raise InferenceWorkerError(f"inference worker: cannot load {model}: {exc}") from None
        if status != "ready":
            self.close()
            raise InferenceWorkerError(f"inference worker: cannot load {model}: {payload}")
        self.cfg, self.smp_cfg, self.cameras, self._backend_name, device = payload
        self.device = torch.device(device)

    @property
    def backend_name(self) -> str:
        return self._backend_name

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def warmup(self, iterations: int = 2) -> None:
        """Already done by the worker before it reported ready."""

    def infer(self, obs: Mapping[str, Any], seed: int | None = None, active: Any = None) -> InferenceResult:
        try:
            self._conn.send((dict(obs), seed, active))
            answered = self._conn.poll(self.reply_timeout_s)
        except OSError:
            answered = True  # broken pipe: the child is gone, _receive says how
        if not answered:
            self._kill()
            raise WorkerDiedError(f"inference worker (pid {self.pid}) did not answer within "
                                  f"{self.reply_timeout_s:g} s; killed it")
        status, payload = self._receive()
        if status != "ok":
            raise InferenceWorkerError(f"inference worker: {payload}")
        return payload

    def restart(self) -> None:
        """Replace a dead (or hung) worker with a fresh one; raises InferenceWorkerError if it cannot load."""
        self.close()
        self.restarts += 1
        self._start()

    def close(self) -> None:
        """End the worker: ask, then SIGTERM, then SIGKILL; always reaped (no zombie left)."""
        process, conn = self._process, self._conn
        if conn is not None:
            if process is not None and process.poll() is None:
                try:
                    conn.send(None)
                except OSError:
                    pass
            conn.close()
            self._conn = None
        if process is not None:
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def _receive(self) -> tuple[str, Any]:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            code = self._process.wait() if self._process is not None else None
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise WorkerDiedError(f"inference worker (pid {self.pid}) exited ({how})") from None


def _serve(conn: Connection, model: str, runtime: RuntimeConfig, overrides: dict[str, Any]) -> None:
    """The child: load, warm up, report, then answer ``(obs, seed, active)`` until told to stop."""
    try:
        engine = InferenceEngine(model, runtime, overrides=overrides)
        engine.warmup()
    except Exception as exc:  # reported to the parent, which raises it with the model's name
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", (engine.cfg, engine.smp_cfg, engine.cameras, engine.backend_name, str(engine.device))))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if request is None:
            return
        obs, seed, active = request
        try:
            result = engine.infer(obs, seed=seed, active=active)
        except Exception as exc:  # a bad observation must not end the worker; the caller gets the reason
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            continue
        try:
            conn.send(("ok", result))
        except OSError:
            return


def _child_main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int(argv[1]))
    try:
        model, runtime, overrides = conn.recv()
    except (EOFError, OSError):
        return 0
    _serve(conn, model, runtime, overrides)
    conn.close()
    # The worker holds no files or state worth tearing down, and the interpreter's teardown of a
    # process with torch loaded takes about a second on a busy 2-core machine: the parent's
    # shutdown would wait for it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv))
