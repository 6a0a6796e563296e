"""Four-series studies from the BraTS training cases (FLAIR, T1, T1GD, T2), aligned or with a known
rigid misalignment per series, for the co-registration and routing tests and the benchmark.

Only ``../shared/data/train/brats`` is read: the holdout is for final evaluation alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from converters.case import Case
from converters.nifti import load_case
from converters.registration import edge_points, move_series
from converters.resample import world_points

BRATS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "train" / "brats"

#: The known misalignment: per series (rotations about x, y, z in degrees; translation in mm), a few
#: degrees and millimetres, different per series; about the brain's centre.
MOTIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "T1": ((3.0, -2.0, 4.0), (4.0, -3.0, 2.0)),
    "T1GD": ((-4.0, 2.0, -2.0), (-3.0, 5.0, -2.0)),
    "T2": ((2.0, 4.0, -3.0), (2.0, 2.0, -5.0)),
}


def brats_case(name: str = "BraTS2021_00005", margin: int = 6, multiple: int = 1) -> Case:
    """A complete BraTS training case, cropped to its head's box plus ``margin`` voxels (smaller studies,
    the same anatomy and world coordinates); skips when the data is not here.

    ``multiple``: each side of the box grown (where the volume allows) to a multiple of this many voxels,
    e.g. 8 for rows and columns as most scanners' matrices have them.
    """
    folder = BRATS / name
    if not folder.is_dir():
        pytest.skip(f"no BraTS training case at {folder}")
    case = load_case(folder)
    head = np.any(np.stack([image > 0 for image in case.images.values()]), axis=0)
    lo = np.maximum(np.argwhere(head).min(axis=0) - margin, 0)
    hi = np.minimum(np.argwhere(head).max(axis=0) + margin + 1, head.shape)
    size = -(-(hi - lo) // multiple) * multiple
    hi = np.minimum(lo + size, head.shape)
    lo = np.maximum(hi - size, 0)
    return crop_case(case, tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True)))


def crop_case(case: Case, box: tuple[slice, ...]) -> Case:
    """``case`` cut to the voxel ``box`` (one slice per axis, steps of 1), its affine moved to the box's
    first voxel: the same anatomy at the same world coordinates."""
    first = np.array([s.start or 0 for s in box])
    affine = case.affine.copy()
    affine[:3, 3] = world_points(case.affine, first[None, :])[0]
    return dataclasses.replace(
        case,
        images={m: np.ascontiguousarray(image[box]) for m, image in case.images.items()},
        affine=affine,
        label=None if case.label is None else np.ascontiguousarray(case.label[box]),
    )


def brain_of(case: Case) -> npt.NDArray[np.bool_]:
    """The BraTS brain (skull-stripped: every non-zero FLAIR voxel)."""
    return np.asarray(case.images["FLAIR"] > 0)


def brain_centre(case: Case) -> npt.NDArray[np.float64]:
    """World centre (mm) of the brain."""
    return world_points(case.affine, np.argwhere(brain_of(case)).mean(axis=0, keepdims=True))[0]


def misaligned(case: Case) -> tuple[Case, dict[str, npt.NDArray[np.float64]]]:
    """``case`` with T1, T1GD and T2 moved by :data:`MOTIONS`; the true reference -> series matrices."""
    images, truth = move_series(case.images, case.affine, MOTIONS, brain_centre(case))
    return dataclasses.replace(case, images=images), truth


def brain_edge(case: Case) -> npt.NDArray[np.float64]:
    """World points of the brain's surface."""
    return edge_points(brain_of(case), case.affine)
