"""Errors the bag tools promise; every message names the bag (file or directory) at fault."""

from __future__ import annotations

from dmn_ros.errors import DmnError

__all__ = ["BagError", "BagReadError", "MissingTopicError", "TruncatedBagError", "UnknownMessageTypeError"]


class BagError(DmnError):
    """Base class of the bag tools' errors; ``path`` is the bag they concern."""

    def __init__(self, message: str, *, path: object = None) -> None:
        super().__init__(message)
        self.path = path
        """The bag (directory or storage file) the error is about."""


class BagReadError(BagError):
    """The bag cannot be opened or read at all (missing, not a rosbag2, corrupt metadata)."""


class TruncatedBagError(BagReadError):
    """The bag's storage file ends early; ``messages_read`` messages were recovered before the cut."""

    def __init__(self, message: str, *, path: object = None, messages_read: int = 0) -> None:
        super().__init__(message, path=path)
        self.messages_read = int(messages_read)
        """Messages decoded before the damage (0 when nothing was usable)."""


class MissingTopicError(BagError):
    """A topic the evaluation needs is not in the bag (or has no messages)."""


class UnknownMessageTypeError(BagError):
    """A needed topic carries a message type the tools cannot decode."""
