"""Exceptions raised by :mod:`db`: the model registry and the node's tables.

Every message names the object (model id, file, task), the attribute and the bad value, so that the
CLI can print it as one line (``error: ...``) and exit with code 2.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base class for every error raised by :mod:`db`."""


class DatabaseConfigError(RegistryError):
    """The config that names the database is missing or malformed."""


class DatabaseUnavailableError(RegistryError):
    """The database cannot be reached or is not at the schema this code needs."""


class ModelNotFoundError(RegistryError):
    """No model row with the given id."""


class InvalidArtifactError(RegistryError):
    """An artifact handed to :meth:`db.registry.Registry.register` is invalid (bad field, missing file)."""


class InvalidModelDirectory(RegistryError):  # noqa: N818 (name fixed by the contract)
    """A model directory's ``model.json`` is missing or malformed, or names a missing or tampered file."""


class ChecksumMismatch(RegistryError):  # noqa: N818 (name fixed by the contract)
    """A registered file no longer matches the sha256 recorded for it."""


class PromotionRefused(RegistryError):  # noqa: N818 (name fixed by the contract)
    """A promotion gate failed (or the model cannot be active at all); the message gives the reason."""


class ConcurrentPromotionError(RegistryError):
    """Another promotion, rollback or retirement of the same task committed first; nothing was changed."""


class RollbackError(RegistryError):
    """A task has no active model, or no previous active model to roll back to."""


class RetireRefusedError(RegistryError):
    """A model cannot be retired (already retired, or the active model of its task)."""


class ModelRetiredError(RegistryError):
    """The model is retired: it can no longer be promoted, verified or rolled back to."""


class DatabaseOperationError(RegistryError):
    """A database operation failed inside SQLAlchemy without an error from the driver (a connection
    pool exhausted, say); :class:`DatabaseUnavailableError` covers the driver's errors. The registry
    also raises it for a value the database refuses (a ``DataError``: out of range, too long)."""


class JobNotFoundError(RegistryError):
    """No node job with the given id."""


class JobStateError(RegistryError):
    """A node job is not in a state that allows the request (retrying a queued or running job)."""
