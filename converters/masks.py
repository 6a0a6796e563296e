"""Binary-mask helpers shared by brain extraction, registration, the preview and the metrics.

Each is the textbook scipy / numpy form computed a faster way (tests/converters/test_brain_mask.py
checks them against it): on a 1 mm brain the three together took ~0.4 s less per brain extraction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage


def fill_holes(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """``ndimage.binary_fill_holes(mask)``: the background not 6-connected to the array's border joins
    ``mask``. Found by labelling the background once (~3x faster than scipy's iterated dilation)."""
    background = ~np.asarray(mask, dtype=bool)
    labels, count = ndimage.label(background)
    if count == 0:
        return ~background
    outside = np.zeros(count + 1, dtype=bool)
    for axis in range(labels.ndim):
        for end in (0, -1):
            outside[np.take(labels, end, axis=axis)] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[labels]


def surface(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """``mask & ~ndimage.binary_erosion(mask)``: voxels of ``mask`` with a 6-neighbour outside it (the
    array's border counts as outside), by shifted comparisons rather than scipy's erosion."""
    mask = np.asarray(mask, dtype=bool)
    interior = mask.copy()
    for axis in range(mask.ndim):
        lower = [slice(None)] * mask.ndim
        upper = [slice(None)] * mask.ndim
        lower[axis], upper[axis] = slice(None, -1), slice(1, None)
        interior[tuple(upper)] &= mask[tuple(lower)]
        interior[tuple(lower)] &= mask[tuple(upper)]
        for end in (0, -1):
            edge: list[Any] = [slice(None)] * mask.ndim
            edge[axis] = end
            interior[tuple(edge)] = False
    return mask & ~interior


def bounding_box(mask: npt.NDArray[np.bool_]) -> tuple[slice, ...] | None:
    """The smallest box holding every voxel of ``mask`` (None when it has none)."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        rows = np.flatnonzero(np.any(mask, axis=others))
        if rows.size == 0:
            return None
        box.append(slice(int(rows[0]), int(rows[-1]) + 1))
    return tuple(box)
