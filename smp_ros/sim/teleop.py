"""Simulated teleoperation: the scripted demonstrators move the LEADER arms of two PiPER
leader/follower pairs, so the followers, piper_sdk and the drivers see what a real teleop rig produces.

On a real rig each leader arm shares its follower's CAN bus in master-slave mode: the leader's
firmware puts the control frames a host would send on the bus (``sim.can_emulator.LeaderArm``) and
the follower obeys them. Here the operator's hands are a :class:`~smp_ros.sim.scripted.ScriptedExpert`
planning from the scene, once per control period of simulated time, exactly as ``sim-demos`` runs it;
what reaches the followers is the leaders' frames, not the expert's commands. The driver side
(teleop mode: ``leader_joint_states`` beside ``joint_states``) is unchanged from hardware.

:class:`ScriptedTeleop` is a world post-step hook, registered after the follower emulators'
(``attach``) so that both leaders and followers run on the emulators' monotone clock (a world reset
does not rewind it) and their CAN stamps agree. Call :meth:`ScriptedTeleop.reset` after every
``world.reset``: the expert starts again from the home pose.
"""

from __future__ import annotations

import math

import numpy as np

from smp_ros.config import ARMS
from smp_ros.sim.can_emulator import LeaderArm
from smp_ros.sim.scripted import ScriptedExpert


class ScriptedTeleop:
    """Scripted hands on two leader arms; ``emulators`` are the followers' (``attach(world, channels)``)."""

    def __init__(self, world, emulators: dict, *, rate_hz: float | None = None) -> None:
        missing = [side for side in ARMS if side not in emulators]
        if missing:
            raise ValueError(f"ScriptedTeleop: no follower emulator for arm(s) {missing}")
        self.world = world
        self.emulators = emulators
        self.clock = emulators[ARMS[0]]  # both followers' clocks advance together (one world)
        self.dt = 1.0 / world.cfg.control_rate_hz
        rate = rate_hz if rate_hz is not None else world.cfg.feedback_rate_hz
        self.expert = ScriptedExpert(world, self.dt)
        self._action = np.zeros(2 * 7)
        # On the followers' clock from the start (it survives world resets and rebuilds).
        self.leaders = {side: LeaderArm(emulators[side].channel, lambda t, i=i: self._pose(i), rate_hz=rate,
                                        start_time=self.clock.time) for i, side in enumerate(ARMS)}
        self.reset()

    def reset(self) -> None:
        """A new episode: the hands start from the arms' (home) targets and re-plan for the scene."""
        self.expert.reset(self.world.task.name)
        self._action = self.expert.action()
        self._due = self.clock.time + self.dt  # the first planning step, one control period in

    @property
    def phase(self) -> str:
        return self.expert.phase

    def _pose(self, index: int) -> tuple[np.ndarray, float]:
        a = self._action[7 * index:7 * index + 7]
        return a[:6], float(a[6])

    def __call__(self, world) -> None:
        now = self.clock.time
        while now >= self._due - 1e-9:  # once per control period of simulated time, as sim-demos steps it
            self._action = self.expert.act(None)
            self._due += self.dt
        for leader in self.leaders.values():
            if now > leader.time:
                leader.advance(now - leader.time)

    def hook_horizon(self, world) -> int:
        """Physics steps until the next leader frame or planning step is due (see BimanualWorld)."""
        due = min(min(leader.next_frame_time for leader in self.leaders.values()), self._due)
        due -= 1e-9 + self.clock.time
        return max(1, math.ceil(due / world.cfg.physics_dt))

    def close(self) -> None:
        for leader in self.leaders.values():
            leader.close()
