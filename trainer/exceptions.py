"""Exceptions raised by the trainer; each message names the object, the attribute and the bad value."""

from __future__ import annotations

from typing import Any


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


class AccuracyCheckError(TrainerError):
    """An exported INT8 model lost more validation Dice against its FP32 IR than ``--max-dice-drop``.

    ``card`` is the model card written beside the (unregistered) files, for the caller to show.
    """

    def __init__(self, message: str, card: dict[str, Any]) -> None:
        super().__init__(message)
        self.card = card
