"""Errors raised while turning bags into training data. Every message names what is at fault."""

from __future__ import annotations


class DataError(ValueError):
    """Base class: the demonstration data cannot be used as given."""


class BagError(DataError):
    """A bag (or one topic of it) is unreadable, incomplete or holds data of the wrong kind.

    ``where`` is "bag", "bag topic" or "bag topic at t=... s" so the message points at the fault.
    """

    def __init__(self, bag: object, message: str, topic: str | None = None, time_s: float | None = None):
        self.bag = str(bag)
        self.topic = topic
        self.time_s = time_s
        where = self.bag
        if topic is not None:
            where += f" topic {topic}"
        if time_s is not None:
            where += f" at t={time_s:.3f} s"
        super().__init__(f"{where}: {message}")


class EpisodeError(BagError):
    """The bag was read but the episode it holds is unusable (gap, too short, ...)."""


class CacheMismatchError(DataError):
    """A dataset cache was built with another ingest configuration or from other bags."""
