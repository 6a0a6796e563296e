"""Exceptions raised by converters; each message names the object, the attribute and the bad value."""

from __future__ import annotations


class ConverterError(Exception):
    """Base class for every error raised by :mod:`converters`."""


class InvalidCaseError(ConverterError):
    """A NIfTI case or dataset folder cannot be read (missing file, bad layout, shape mismatch)."""


class HoldoutDataError(ConverterError):
    """A case lies under a ``holdout`` folder where holdout data is not allowed (training, validation,
    calibration: anything that chooses a checkpoint or a threshold). Holdout data is for final
    evaluation only."""


class InvalidSeriesError(ConverterError):
    """A DICOM series cannot be assembled into a volume (mixed sizes, gaps, missing pixels...)."""


class ModelCardError(ConverterError):
    """A model card (model.json) is missing a key or holds a bad value (task, modalities, output...)."""


class PredictionError(ConverterError):
    """Slices cannot go through a slice predictor (bad batch size, network output of the wrong shape)."""
