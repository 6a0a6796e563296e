"""Exceptions raised by the trainer; each message names the object, the attribute and the bad value."""

from __future__ import annotations


class TrainerError(Exception):
    """Base class for every error raised by :mod:`trainer` (bad data, run dir, model or option)."""


class DeviceError(TrainerError):
    """The requested device kind is not available on this machine."""


class UnreadableCheckpointError(TrainerError):
    """A checkpoint file exists but cannot be read: damaged (truncated, overwritten) or not PyTorch's.

    ``reason`` is what the reader said, in one short line.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
