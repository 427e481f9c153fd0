"""Inference in a worker process, behind the same API as ``InferenceEngine``.

Why a process: PyTorch releases the GIL inside every operator and takes it back afterwards. In a
process whose other threads run Python continuously (the simulator, piper_sdk's CAN parsing, ROS
callbacks), every take-back can wait for a whole switch interval, and an eager inference is a few
thousand small operators: on 2 cores an 84 ms inference took 1-2 s inside the simulated bringup.
A worker process has its own interpreter and GIL. Observations and results cross a pipe (about
0.2 MB per call for two 128x128 cameras over T_o = 2 steps), a fraction of a millisecond.

``runtime.inference_process: true`` makes the policy node use it.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any, Mapping

import torch

from smp_ros.config import RuntimeConfig
from smp_ros.runtime.engine import InferenceEngine, InferenceResult

START_TIMEOUT_S = 600.0  # loading and warming up (compiling) a model on a slow CPU


class InferenceWorkerError(RuntimeError):
    """The worker process failed to load the model or to run an inference; the message says why."""


class EngineProcess:
    """``InferenceEngine(model, runtime, overrides=...)`` running in a spawned child process.

    The child loads and warms the engine up before the constructor returns, so ``warmup()`` has
    nothing left to do. ``close()`` (or the parent's exit: the child is a daemon) ends it."""

    def __init__(self, model: str | Path, runtime: RuntimeConfig | None = None, *,
                 overrides: Mapping[str, Any] | None = None, start_timeout_s: float = START_TIMEOUT_S) -> None:
        ctx = mp.get_context("spawn")  # a fork would copy the parent's threads' locks mid-use
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child, str(model), runtime or RuntimeConfig(),
                                                         dict(overrides or {})),
                                    name="smp-inference", daemon=True)
        self._process.start()
        child.close()
        if not self._conn.poll(start_timeout_s):
            self.close()
            raise InferenceWorkerError(f"inference worker: {model} not loaded within {start_timeout_s:.0f} s")
        status, payload = self._receive()
        if status != "ready":
            self.close()
            raise InferenceWorkerError(f"inference worker: cannot load {model}: {payload}")
        self.cfg, self.smp_cfg, self.cameras, self._backend_name, device = payload
        self.device = torch.device(device)
        self.model_dir = Path(model)

    @property
    def backend_name(self) -> str:
        return self._backend_name

    def warmup(self, iterations: int = 2) -> None:
        """Already done by the worker before it reported ready."""

    def infer(self, obs: Mapping[str, Any], seed: int | None = None, active: Any = None) -> InferenceResult:
        self._conn.send((dict(obs), seed, active))
        status, payload = self._receive()
        if status != "ok":
            raise InferenceWorkerError(f"inference worker: {payload}")
        return payload

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=5.0)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(timeout=5.0)
        self._conn.close()

    def _receive(self) -> tuple[str, Any]:
        try:
            return self._conn.recv()
        except EOFError:
            raise InferenceWorkerError(f"inference worker exited (exit code {self._process.exitcode})") from None


def _serve(conn, model: str, runtime: RuntimeConfig, overrides: dict[str, Any]) -> None:
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
        except EOFError:
            return
        if request is None:
            return
        obs, seed, active = request
        try:
            conn.send(("ok", engine.infer(obs, seed=seed, active=active)))
        except Exception as exc:  # a bad observation must not end the worker; the caller gets the reason
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
