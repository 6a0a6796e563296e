"""Exceptions raised by the trainer; each message names the object, the attribute and the bad value."""

from __future__ import annotations


class TrainerError(Exception):
    """Base class for every error raised by :mod:`trainer` (bad data, run dir, model or option)."""


class DeviceError(TrainerError):
    """The requested device kind is not available on this machine."""
