"""Exceptions raised by the node."""

from __future__ import annotations


class NodeError(Exception):
    """Base class for node errors."""


class ConfigError(NodeError):
    """The configuration file or an environment override is invalid."""


class InvalidInstanceError(NodeError):
    """A received data set cannot be stored (missing or malformed UIDs, no pixel data)."""


class SpoolError(NodeError):
    """The spool could not take an instance (disk full, permissions)."""


class JobError(NodeError):
    """A job cannot run; ``skip`` says whether it ends ``skipped`` (study lacks a need) or ``failed``."""

    def __init__(self, message: str, *, skip: bool = False) -> None:
        super().__init__(message)
        self.skip = skip


class SelectionError(JobError):
    """The study lacks a series for a modality the model needs (the job is skipped)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, skip=True)


class InferenceError(JobError):
    """A route's model failed on the study (preprocessing or inference): the job falls back to the next,
    less capable route, as when a series cannot be read; on the last route the job fails."""


class ModelLoadError(NodeError):
    """No usable model: none active, a file missing or tampered (sha256 mismatch), or a bad device."""
