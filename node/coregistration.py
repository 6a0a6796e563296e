"""The ``register`` stage: every series of a multi-sequence model onto the reference series' grid.

First the DICOM geometry: a series in the reference's Frame of Reference (same FrameOfReferenceUID,
PS3.3 C.7.4.1) is already placed in the same patient coordinates, whatever its orientation, spacing
or slice thickness; one in another Frame of Reference starts from the tops of the two heads
(:func:`start_between_heads`: the same anatomy whatever each series' field of view). Then a
rigid refinement by Mattes mutual information (:func:`converters.registration.register_rigid`),
because patients move between series. Each series' figures (translation, rotation, displacement at
the brain's edge, similarity before and after) go into the job's result; a series whose registration
fails its check makes the study fall back to the next model of ``[routing] order`` (the pipeline
decides), with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from converters.masks import bounding_box
from converters.registration import (
    FixedImage,
    RegistrationError,
    RigidResult,
    apply_rigid,
    prepare_fixed,
    register_rigid,
)
from converters.resample import resample_to_grid, world_points
from converters.volume import Volume
from node.config import RegistrationConfig
from node.selection import SeriesInfo

logger = logging.getLogger(__name__)


@dataclass
class LoadedSeries:
    """One chosen series, loaded: its volume, its RAS array and affine, its datasets."""

    modality: str
    info: SeriesInfo
    volume: Volume
    array: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    datasets: list[Dataset]

    @property
    def frame_of_reference_uid(self) -> str:
        """The series' FrameOfReferenceUID ("" when absent)."""
        return str(self.datasets[0].get("FrameOfReferenceUID", "") or "") if self.datasets else ""


@dataclass
class SeriesAlignment:
    """How one series was put onto the reference grid."""

    modality: str
    series_instance_uid: str
    same_frame_of_reference: bool
    method: str
    result: RigidResult | None = None
    ok: bool = True
    reason: str = ""
    #: Share of the reference's brain mask that lies within the moved series (None without a mask).
    brain_coverage: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for the job's result."""
        out: dict[str, Any] = {
            "series": self.series_instance_uid,
            "same_frame_of_reference": self.same_frame_of_reference,
            "method": self.method,
            "ok": self.ok,
            "reason": self.reason,
            "brain_coverage": None if self.brain_coverage is None else round(self.brain_coverage, 4),
        }
        if self.result is not None:
            figures = self.result.as_dict()
            out.update({k: figures[k] for k in (
                "translation_mm", "rotation_deg", "edge_displacement_mm", "metric_start", "metric_final",
                "iterations", "seconds", "matrix", "start_offset_mm", "metric_mirrored",
            )})  # fmt: skip
        return out


@dataclass
class Coregistered:
    """The series of a study on the reference grid (RAS arrays) and how each got there."""

    reference: str
    images: dict[str, npt.NDArray[np.float32]]
    affine: npt.NDArray[np.float64]
    alignments: dict[str, SeriesAlignment] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        """One line per series whose registration failed its check."""
        return [
            f"registration of {a.modality} failed: {a.reason}" for a in self.alignments.values() if not a.ok
        ]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for the job's result."""
        return {
            "reference": self.reference,
            "series": {m: a.as_dict() for m, a in self.alignments.items()},
        }


def _head_points(
    array: npt.NDArray[Any], affine: npt.NDArray[Any], most: int = 400_000
) -> tuple[npt.NDArray[np.float64], float]:
    """World points (mm) of the voxels above a tenth of the 99th intensity percentile (the head's
    foreground; every voxel when none is), at most about ``most`` of them, and the volume (mm^3) each
    point stands for.

    The volume is read on an evenly strided grid (every k-th voxel along each axis) small enough that
    its foreground holds about ``most`` points: the indices of every foreground voxel of a 0.5 mm 3D
    series (35 million voxels) took about 800 MiB and 3 s per series registered."""
    values = np.asarray(array)
    stride = max(1, int(np.ceil((values.size / (4 * most)) ** (1 / 3))))
    grid = np.asarray(values[::stride, ::stride, ::stride], dtype=np.float32)
    level = 0.1 * float(np.percentile(grid, 99.0))
    indices = np.argwhere(grid > level)
    if len(indices) == 0:
        indices = np.argwhere(np.ones(grid.shape, dtype=bool))
    step = max(1, int(np.ceil(len(indices) / most)))
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))
    return world_points(affine, indices[::step] * stride), voxel_mm3 * step * stride**3


#: Another Frame of Reference's registration starts with the tops of the two heads on each other: the
#: centre of each head's foreground within this many mm (RAS z, superior) of its top, or within the
#: smaller of the two heads' extents below their tops: about the brain's height with its scalp. The
#: centre of a whole head is not the brain's: a sagittal T1 covering head and neck against an axial
#: FLAIR covering 110-160 mm of brain started 38.8-62.8 mm off in z and ended 42.8 mm wrong.
HEAD_TOP_MM = 120.0

#: The foreground volume (mm^3) above a head's top as :func:`start_between_heads` places it: a few
#: bright voxels above the vertex do not move it.
TOP_VOLUME_MM3 = 2000.0


def start_between_heads(
    moving: npt.NDArray[Any],
    moving_affine: npt.NDArray[Any],
    reference: npt.NDArray[Any],
    reference_affine: npt.NDArray[Any],
) -> npt.NDArray[np.float64]:
    """The start (4x4 translation, reference -> moving, world mm) for a series in another Frame of
    Reference than the reference's: the centres of the two heads' top parts put on each other.

    Each head's top is where :data:`TOP_VOLUME_MM3` of its foreground lies above (RAS z: DICOM patient
    coordinates are the patient's in every Frame of Reference, PS3.3 C.7.6.2.1.1); its top part is the
    foreground within :data:`HEAD_TOP_MM`, or the smaller of the two heads' extents, below it. A series
    covering the head and neck and one covering the brain only then start from the same anatomy.
    """
    sides = []
    for array, affine in ((moving, moving_affine), (reference, reference_affine)):
        points, each_mm3 = _head_points(array, affine)
        order = np.argsort(points[:, 2])[::-1]
        top = float(points[order[min(len(order) - 1, int(TOP_VOLUME_MM3 / each_mm3))], 2])
        sides.append((points, top, top - float(points[order[-1], 2])))
    depth = min(HEAD_TOP_MM, sides[0][2], sides[1][2])
    centres = [points[points[:, 2] >= top - depth].mean(axis=0) for points, top, _ in sides]
    start = np.eye(4)
    start[:3, 3] = centres[0] - centres[1]
    return start


#: Voxels kept around the brain mask's box when a moved series is resampled: preprocessing zeroes
#: everything outside the brain and its trilinear step onto the model grid reads at most one voxel
#: beyond the mask (node/pipeline.py ``preprocess``).
BOX_MARGIN_VOXELS = 2


def brain_box(brain_mask: npt.NDArray[np.bool_] | None) -> tuple[slice, slice, slice] | None:
    """The brain mask's bounding box grown by :data:`BOX_MARGIN_VOXELS` per side (clipped to the
    grid); None without a mask or with an empty one (then a whole series is resampled)."""
    if brain_mask is None or (box := bounding_box(brain_mask)) is None:
        return None
    x, y, z = (
        slice(max(b.start - BOX_MARGIN_VOXELS, 0), min(b.stop + BOX_MARGIN_VOXELS, n))
        for b, n in zip(box, brain_mask.shape, strict=True)
    )
    return x, y, z


def align_series(
    moving: LoadedSeries,
    reference: LoadedSeries,
    brain_mask: npt.NDArray[np.bool_] | None,
    config: RegistrationConfig,
    fixed: FixedImage | None = None,
) -> tuple[npt.NDArray[np.float32], SeriesAlignment]:
    """``moving`` on the reference's RAS grid, and how it got there (``fixed``: the reference prepared
    by :func:`converters.registration.prepare_fixed`, shared by the series of a study).

    With a brain mask only its box (:func:`brain_box`) is resampled and the rest is zero: the model
    reads nothing of a moved series outside the brain, and resampling a whole head costs ~3x more."""
    box = brain_box(brain_mask)
    same_for = bool(moving.frame_of_reference_uid) and (
        moving.frame_of_reference_uid == reference.frame_of_reference_uid
    )
    start = "geometry" if same_for else "tops of the heads"
    alignment = SeriesAlignment(moving.modality, moving.info.series_instance_uid, same_for, start)
    shape = tuple(int(v) for v in reference.array.shape[:3])
    grid = (shape[0], shape[1], shape[2])
    initial = None
    if not same_for:
        initial = start_between_heads(moving.array, moving.affine, reference.array, reference.affine)
    if not config.enabled:
        matrix = np.eye(4) if initial is None else initial
        _check_coverage(alignment, moving, reference.affine, brain_mask, matrix, config)
        return apply_rigid(moving.array, moving.affine, matrix, reference.affine, grid, box), alignment
    alignment.method += " + rigid (Mattes MI)"
    try:
        result = register_rigid(
            fixed if fixed is not None else reference.array,
            reference.affine,
            moving.array,
            moving.affine,
            fixed_mask=brain_mask,
            settings=config.settings(),
            initial=initial,
        )
    except RegistrationError as exc:
        alignment.ok, alignment.reason = False, str(exc)
        return resample_to_grid(moving.array, moving.affine, reference.affine, grid), alignment
    alignment.result, alignment.ok, alignment.reason = result, result.ok, result.reason
    _check_coverage(alignment, moving, reference.affine, brain_mask, result.matrix, config)
    return (
        apply_rigid(moving.array, moving.affine, result.matrix, reference.affine, grid, box),
        alignment,
    )


def brain_coverage(
    moving: LoadedSeries,
    reference_affine: npt.NDArray[np.float64],
    brain_mask: npt.NDArray[np.bool_],
    matrix: npt.NDArray[np.float64],
    most: int = 200_000,
) -> float:
    """Share of the reference's brain mask whose anatomy lies within ``moving`` (each voxel covering
    half a voxel past its centre) once ``matrix`` (reference -> moving, world) places it; at most
    ``most`` mask voxels, evenly taken, are looked at."""
    indices = np.argwhere(brain_mask)
    if len(indices) == 0:
        return 1.0
    if len(indices) > most:
        indices = indices[:: int(np.ceil(len(indices) / most))]
    world = world_points(reference_affine, indices)
    to_moving = np.linalg.inv(np.asarray(moving.affine, dtype=np.float64)) @ np.asarray(matrix, np.float64)
    voxel = world @ to_moving[:3, :3].T + to_moving[:3, 3]
    upper = np.asarray(moving.array.shape[:3], dtype=np.float64) - 0.5
    inside = np.all((voxel >= -0.5) & (voxel <= upper), axis=1)
    return float(inside.mean())


def _check_coverage(
    alignment: SeriesAlignment,
    moving: LoadedSeries,
    reference_affine: npt.NDArray[np.float64],
    brain_mask: npt.NDArray[np.bool_] | None,
    matrix: npt.NDArray[np.float64],
    config: RegistrationConfig,
) -> None:
    """Fail ``alignment`` when ``moving`` covers less than ``config.min_brain_coverage`` of the brain.

    A series that covers a slab of the brain (a few slices through the lesion) registers well on the
    slab and gives the model zeros everywhere else: a T1GD covering 30 % of the brain tripled the
    enhancing tumour's volume.
    """
    if brain_mask is None or not np.any(brain_mask):
        return
    alignment.brain_coverage = brain_coverage(moving, reference_affine, brain_mask, matrix)
    if alignment.brain_coverage < config.min_brain_coverage:
        why = (
            f"covers {100 * alignment.brain_coverage:.0f} % of the reference's brain "
            f"(< {100 * config.min_brain_coverage:g} %)"
        )
        alignment.ok = False
        alignment.reason = f"{alignment.reason}; {why}" if alignment.reason else why


def coregister(
    series: Mapping[str, LoadedSeries],
    reference: str,
    modalities: Sequence[str],
    brain_mask: npt.NDArray[np.bool_] | None,
    config: RegistrationConfig,
) -> Coregistered:
    """Every modality of ``modalities`` on the grid of ``series[reference]``.

    Parameters
    ----------
    series:
        Modality -> loaded series (every modality of ``modalities``).
    reference:
        The modality whose grid the others join (its image is used as it is).
    modalities:
        The model's modalities, in its channel order.
    brain_mask:
        The reference's brain mask on its RAS grid (the metric's region, the edge of the reported
        displacement), or None.
    config:
        The ``[registration]`` settings.
    """
    ref = series[reference]
    out = Coregistered(reference=reference, images={}, affine=ref.affine)
    fixed = prepare_fixed(ref.array, ref.affine, brain_mask, config.settings()) if config.enabled else None
    moving = [m for m in modalities if m != reference]
    with ThreadPoolExecutor(max_workers=max(1, min(config.parallel, len(moving)))) as pool:
        aligned = dict(zip(moving, pool.map(
            lambda m: align_series(series[m], ref, brain_mask, config, fixed), moving
        ), strict=True))  # fmt: skip
    for modality in modalities:
        if modality == reference:
            out.images[modality] = ref.array
            continue
        image, alignment = aligned[modality]
        out.images[modality] = image
        out.alignments[modality] = alignment
        figures = alignment.result
        if figures is not None:
            logger.info(
                "%s onto %s: %.1f mm, %.1f deg, %.1f mm at the brain's edge, MI %.3f -> %.3f (%.1f s)%s",
                modality, reference, figures.translation_mm, figures.rotation_deg,
                figures.edge_displacement_mm, figures.metric_start, figures.metric_final, figures.seconds,
                "" if alignment.ok else f"; failed: {alignment.reason}",
            )  # fmt: skip
    return out
