"""The two simulated PiPER arms: what the evaluation harness (``sim/evaluate.py``, backend ``piper``)
and the simulator node (``nodes/sim_node.py``) both build.

Per side, a ``PiperCanEmulator`` attached to the world's arm on its own python-can virtual channel,
and the real driver, a ``PiperArm`` (piper_sdk) on that channel, whose clock is the emulator's
simulated time. The arms outlive a world: ``attach`` puts fresh emulators on a new world (another
task) on the same channels, and the connected arms keep talking to them.
"""

from __future__ import annotations

from smp_ros.config import ARMS, SafetyConfig
from smp_ros.hardware.piper import BimanualPiper, PiperArm
from smp_ros.sim.can_emulator import PiperCanEmulator, attach


class PiperRig:
    """Both arms through piper_sdk over virtual CAN to emulators on a ``BimanualWorld``."""

    def __init__(self, channels: dict[str, str], safety: SafetyConfig | None = None, speed_percent: int = 50) -> None:
        if set(channels) != set(ARMS):
            raise ValueError(f"PiperRig: channels needs one channel per arm {ARMS}, got {sorted(channels)}")
        self.channels = dict(channels)
        self.emulators: dict[str, PiperCanEmulator] = {}
        self.arms = {side: PiperArm(channels[side], side, bustype="virtual", safety=safety,
                                    speed_percent=speed_percent, clock=self._clock(side)) for side in ARMS}
        self.pair = BimanualPiper(self.arms["left"], self.arms["right"])  # both as one 14-D device

    def _clock(self, side: str):
        return lambda: self.emulators[side].time  # simulated time is the arm's clock

    def attach(self, world) -> None:
        """Emulators on ``world``'s arms (post-step hooks), on this rig's channels."""
        self.emulators = attach(world, self.channels)

    def detach(self) -> None:
        """Close the emulators' buses (the world they hook into is the caller's to close)."""
        for emu in self.emulators.values():
            emu.close()

    def connect(self) -> None:
        self.pair.connect()

    def disconnect(self) -> None:
        self.pair.disconnect()

    def wait_for_feedback(self) -> None:
        """Wait (wall clock) until piper_sdk has parsed each emulator's newest feedback tick; on a busy
        machine that may take seconds. Raises RuntimeError when an SDK's receive thread is not running."""
        for side, arm in self.arms.items():
            if not arm.wait_for_feedback(self.emulators[side].last_feedback_time or 0.0):
                raise RuntimeError(f"{side} arm: piper_sdk did not parse the emulator's feedback in time; "
                                   "its receive thread is not running")

    def close(self) -> None:
        self.disconnect()
        self.detach()
