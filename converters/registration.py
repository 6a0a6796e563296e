"""Rigid co-registration of one series onto another in world (RAS) coordinates, with SimpleITK.

Both images keep their own grids: a SimpleITK image is built from each array and its 4x4 voxel-to-RAS
affine, so the identity transform *is* the alignment the DICOM geometry gives (the same
FrameOfReferenceUID: :func:`converters.resample.resample_to_grid` would put one on the other's grid as
it is). Patients move between series, so a rigid transform (rotation about the brain's centre plus a
translation) is refined from there by Mattes mutual information (different contrasts: FLAIR against
T1, T2...) on copies whose intensities are winsorized (``winsorize``), multi-resolution (shrink 4,
2 on a brain-masked, 2 mm copy), and checked:

* the metric at the end must be no worse than at the start (the geometry alone);
* the translation and the rotation must stay under configurable limits;
* the final metric must reach an absolute floor (``min_similarity``) and beat the series mirrored
  left-right (``mirror_margin``).

:class:`RigidResult` records how far the series moved (translation in mm, rotation in degrees, the
largest displacement of a point of the brain's edge in mm) and the similarity before and after.
:func:`apply_rigid` resamples the moving series onto the reference grid through the found transform.

The transform maps a point of the reference (fixed) series to the point of the moving series that
shows the same anatomy, as SimpleITK's registration transforms do (fixed -> moving).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from converters.exceptions import ConverterError
from converters.masks import surface
from converters.resample import resample_to_grid, world_points

logger = logging.getLogger(__name__)


class RegistrationError(ConverterError):
    """The registration could not run (no overlap between the images, a degenerate image)."""


@dataclass(frozen=True)
class RegistrationSettings:
    """How :func:`register_rigid` runs and what it accepts (the ``[registration]`` section of node.toml).

    Attributes
    ----------
    working_spacing_mm:
        Isotropic spacing of the copies the metric is computed on (2 mm: a 1 mm series' edge is
        recovered within a fraction of a millimetre, at an eighth of the voxels).
    shrink_factors, smoothing_sigmas:
        The resolution pyramid on top of the working copies (sigmas in mm).
    iterations:
        Most optimizer iterations per level.
    sampling_fraction:
        Share of the (masked) fixed voxels the metric samples, randomly with a fixed seed.
    histogram_bins:
        Mattes mutual information bins.
    mask_dilation_mm:
        The reference brain mask is dilated by this much, so the brain's edge (where contrasts
        differ most) is in the metric.
    max_translation_mm, max_rotation_deg:
        A transform beyond either is refused (movement larger than a patient's between series is a
        failed registration, not motion).
    max_metric_worsening:
        The final metric may be at most this much above (worse than) the geometry-only start (the
        sampled metric varies by ~0.001 between evaluations: a series already aligned must pass),
        or five times as much when the result moved no point of the brain's edge more than
        :data:`SETTLED_MM` from the start (it did not diverge).
    mirror_margin:
        A registration fails unless the moving series fits the reference better by at least this
        (Mattes MI) than the same series mirrored left-right about the brain's mid-plane as the
        registration placed it: a series flipped in its pixels or its orientation header, which no
        rigid motion undoes, was accepted with its tumour on the wrong side. On the 8 BraTS training
        cases (T1, T1GD, T2 onto FLAIR) the mirror fitted 0.165-0.615 worse than a correct series,
        and between 0.33 better and 0.07 worse than a flipped one (23 of 24 caught). None: not
        checked.
    min_similarity:
        A registration fails when its final Mattes MI is not below minus this (the fitted series
        hardly resembles the reference there), whatever the limits and the mirror check say: a T1GD
        of pure noise (MI -0.0006) and a head-and-neck T1 fitted 42.8 mm wrong (MI -0.043) passed
        with ``mirror_margin`` None (-0.0009 and -0.048 with ``winsorize``). Correct fits end at
        -0.67 to -1.05 (BraTS T1, T1GD and T2 onto FLAIR, two cases), -1.2 to -1.5 (the Philips and
        Siemens heads onto themselves) and -1.03 (the GE head; -0.109 before ``winsorize``); a review
        measured -0.53 to -0.91 for T1 and T2 onto a BraTS FLAIR on 6 mm slices at SNR down to 2. A
        first floor of 0.08 let through a fit 37 mm wrong at -0.084 (a reference slab 40 mm below the
        vertex; other wrong fits ended at -0.027 to -0.070): 0.25 leaves twice the margin either way.
        None: not checked.
    winsorize:
        Lower and upper percentiles of each working copy's voxels (all of them, as ANTs winsorizes
        by default) that its intensities are clipped to before the metric sees them
        (:func:`_winsorized`): Mattes MI spreads its bins from an image's minimum to its maximum, and
        a few very bright voxels (the real GE head: 99th percentile 85, maximum 5467) squeezed its
        brain into one or two bins; it ended 1.85 mm off at the brain's edge with MI -0.109. None:
        raw intensities.
    threads:
        SimpleITK threads (0: SimpleITK's default).
    learning_rate, min_step, relaxation:
        The regular-step gradient descent: first step (scaled to about a voxel), smallest step, and
        the factor a step shrinks by when the direction turns.
    """

    working_spacing_mm: float = 2.0
    shrink_factors: tuple[int, ...] = (2, 1)
    smoothing_sigmas: tuple[float, ...] = (1.0, 0.0)
    iterations: int = 100
    sampling_fraction: float = 0.08
    histogram_bins: int = 32
    mask_dilation_mm: float = 6.0
    max_translation_mm: float = 20.0
    max_rotation_deg: float = 15.0
    max_metric_worsening: float = 0.01
    mirror_margin: float | None = 0.05
    min_similarity: float | None = 0.25
    winsorize: tuple[float, float] | None = (0.5, 99.5)
    threads: int = 0
    learning_rate: float = 1.0
    min_step: float = 0.01
    relaxation: float = 0.7


@dataclass
class RigidResult:
    """One series' rigid registration onto the reference.

    Attributes
    ----------
    matrix:
        4x4 RAS matrix taking a reference point (mm) to the moving series' point of the same anatomy.
    translation_mm:
        Length of the translation at the centre of rotation (the brain's centre), beyond the start
        (``initial`` of :func:`register_rigid`; the identity, the DICOM geometry, by default).
    rotation_deg:
        Angle of the rotation beyond the start.
    edge_displacement_mm:
        Largest displacement beyond the start of a point of the reference brain mask's surface (or,
        without a mask, of the image's corners).
    metric_start, metric_final:
        Mattes mutual information (SimpleITK's sign: lower is more similar) at the geometry-only
        alignment and at the end.
    metric_mirrored:
        The same at the end with the moving series mirrored left-right about the brain's mid-plane
        (``mirror_margin``; NaN when not computed).
    iterations:
        Optimizer iterations at the last level.
    seconds:
        Wall time of the registration.
    ok:
        Whether the result passed its checks; ``reason`` says why not.
    stop:
        The optimizer's stop condition.
    start_offset_mm:
        How far the start moves the brain's centre (0 for the DICOM geometry; with another Frame of
        Reference the offset between the heads' tops, which the limits do not count).
    """

    matrix: npt.NDArray[np.float64]
    translation_mm: float
    rotation_deg: float
    edge_displacement_mm: float
    metric_start: float
    metric_final: float
    iterations: int
    seconds: float
    ok: bool = True
    reason: str = ""
    stop: str = ""
    start_offset_mm: float = 0.0
    metric_mirrored: float = float("nan")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures (the matrix as nested lists, rounded)."""
        out = asdict(self)
        out["matrix"] = [[round(float(v), 6) for v in row] for row in self.matrix]
        for key in ("translation_mm", "rotation_deg", "edge_displacement_mm", "seconds", "start_offset_mm"):
            out[key] = round(float(out[key]), 3)
        for key in ("metric_start", "metric_final", "metric_mirrored"):
            value = float(out[key])
            out[key] = round(value, 5) if np.isfinite(value) else None
        return out


def _sitk_image(array: npt.NDArray[Any], affine: npt.NDArray[Any]) -> Any:
    """A SimpleITK image of ``array`` (X, Y, Z) whose physical space is the affine's (RAS mm)."""
    import SimpleITK as sitk  # noqa: N813 (SimpleITK's own spelling)

    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing < 1e-6):
        raise RegistrationError("an image's affine has a zero-length axis")
    direction = affine[:3, :3] / spacing
    image = sitk.GetImageFromArray(
        np.ascontiguousarray(np.asarray(array, dtype=np.float32).transpose(2, 1, 0))
    )
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in affine[:3, 3]])
    image.SetDirection([float(v) for v in direction.ravel()])
    return image


def _working_copy(image: Any, spacing_mm: float, binary: bool = False) -> Any:
    """``image`` averaged over blocks of whole voxels to about ``spacing_mm`` (``sitk.BinShrink``:
    fast, no aliasing); a mask (``binary``) keeps every block that holds any of it."""
    import SimpleITK as sitk  # noqa: N813 (SimpleITK's own spelling)

    factors = [max(1, round(spacing_mm / s)) for s in image.GetSpacing()]
    if max(factors) == 1:
        return image
    shrunk = sitk.BinShrink(image, factors)
    return sitk.Cast(shrunk > 0, sitk.sitkUInt8) if binary else shrunk


def _winsorized(image: Any, percentiles: tuple[float, float] | None) -> Any:
    """A working copy with its intensities clipped to ``percentiles`` of all its voxels; ``image``
    itself when ``percentiles`` is None or the range is empty. Over all voxels, not the head's: a
    skull-stripped series' zero background stays below the brain (a floor from the head's voxels
    lifted it to the brain's darkest value and blurred the brain's edge for the metric)."""
    import SimpleITK as sitk  # noqa: N813 (SimpleITK's own spelling)

    if percentiles is None:
        return image
    low, high = (float(v) for v in np.percentile(sitk.GetArrayViewFromImage(image), percentiles))
    if not high > low:
        return image
    return sitk.Clamp(image, lowerBound=low, upperBound=high)


def _matrix(transform: Any) -> npt.NDArray[np.float64]:
    """4x4 matrix of a SimpleITK Euler3D transform (fixed point -> moving point)."""
    rot = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    centre = np.asarray(transform.GetCenter(), dtype=np.float64)
    shift = np.asarray(transform.GetTranslation(), dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = shift + centre - rot @ centre
    return out


def rotation_angle_deg(matrix: npt.NDArray[Any]) -> float:
    """The angle (degrees) of the rotation part of a 4x4 rigid matrix."""
    rot = np.asarray(matrix, dtype=np.float64)[:3, :3]
    cosine = (float(np.trace(rot)) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def edge_points(
    mask: npt.NDArray[np.bool_], affine: npt.NDArray[Any], most: int = 20000
) -> npt.NDArray[np.float64]:
    """World points (N, 3) of the surface voxels of ``mask`` (at most ``most``, evenly taken)."""
    indices = np.argwhere(surface(mask))
    if len(indices) > most:
        indices = indices[:: int(np.ceil(len(indices) / most))]
    return world_points(affine, indices)


def displacement_mm(
    matrix: npt.NDArray[Any], points: npt.NDArray[Any], other: npt.NDArray[Any] | None = None
) -> npt.NDArray[np.float64]:
    """Per point, the distance between where ``matrix`` and ``other`` (default: identity) take it."""
    points = np.asarray(points, dtype=np.float64)
    moved = points @ np.asarray(matrix)[:3, :3].T + np.asarray(matrix)[:3, 3]
    other = np.eye(4) if other is None else np.asarray(other)
    reference = points @ other[:3, :3].T + other[:3, 3]
    return np.asarray(np.linalg.norm(moved - reference, axis=1))


def _corner_points(shape: tuple[int, ...], affine: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    corners = np.array(
        [[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    )
    return world_points(affine, corners)


@dataclass
class FixedImage:
    """The reference side of a registration, prepared once for every series registered onto it:
    its working copy, the metric's mask, the rotation centre and the points of the brain's edge."""

    image: Any
    mask: Any
    centre: npt.NDArray[np.float64]
    points: npt.NDArray[np.float64]


def prepare_fixed(
    fixed: npt.NDArray[Any],
    fixed_affine: npt.NDArray[Any],
    fixed_mask: npt.NDArray[np.bool_] | None = None,
    settings: RegistrationSettings | None = None,
) -> FixedImage:
    """The reference (fixed) image made ready for :func:`register_rigid` (see its parameters)."""
    import SimpleITK as sitk  # noqa: N813 (SimpleITK's own spelling)

    settings = settings or RegistrationSettings()
    image = _winsorized(
        _working_copy(_sitk_image(fixed, fixed_affine), settings.working_spacing_mm), settings.winsorize
    )
    if fixed_mask is None or not np.any(fixed_mask):
        shape = np.asarray(fixed).shape
        centre = world_points(fixed_affine, (np.asarray(shape[:3], dtype=float)[None, :] - 1) / 2.0)[0]
        return FixedImage(image, None, centre, _corner_points(shape, fixed_affine))
    mask = _working_copy(
        sitk.Cast(_sitk_image(np.asarray(fixed_mask, dtype=np.float32), fixed_affine) > 0.5, sitk.sitkUInt8),
        settings.working_spacing_mm,
        binary=True,
    )
    radius = [round(settings.mask_dilation_mm / s) for s in mask.GetSpacing()]
    if max(radius) > 0:
        mask = sitk.BinaryDilate(mask, radius, sitk.sitkBall)
    centre = world_points(fixed_affine, np.argwhere(fixed_mask).mean(axis=0, keepdims=True))[0]
    return FixedImage(image, mask, centre, edge_points(fixed_mask, fixed_affine))


def register_rigid(
    fixed: npt.NDArray[Any] | FixedImage,
    fixed_affine: npt.NDArray[Any] | None,
    moving: npt.NDArray[Any],
    moving_affine: npt.NDArray[Any],
    *,
    fixed_mask: npt.NDArray[np.bool_] | None = None,
    settings: RegistrationSettings | None = None,
    initial: npt.NDArray[Any] | None = None,
) -> RigidResult:
    """Rigidly register ``moving`` onto ``fixed``, both (X, Y, Z) arrays with voxel-to-RAS affines.

    Parameters
    ----------
    fixed, fixed_affine:
        The reference series (e.g. FLAIR) and its affine; or a :class:`FixedImage` from
        :func:`prepare_fixed` (then ``fixed_affine`` and ``fixed_mask`` are not used), to register
        several series onto one reference without preparing it each time.
    moving, moving_affine:
        The series to bring onto it.
    fixed_mask:
        The brain mask on ``fixed``'s grid: the metric samples only inside it (dilated by
        ``settings.mask_dilation_mm``), the rotation centre is its centroid and the reported edge
        displacement is measured on its surface.
    settings:
        Optimisation and acceptance settings (defaults: :class:`RegistrationSettings`).
    initial:
        A 4x4 starting transform (fixed -> moving); default the identity (the DICOM geometry).

    Returns
    -------
    RigidResult
        The transform and its figures; ``ok`` False with a ``reason`` when a check failed (the
        result is still returned so the caller can record it).

    Raises
    ------
    RegistrationError
        The images do not overlap, or SimpleITK refused to run.
    """
    import SimpleITK as sitk  # noqa: N813 (SimpleITK's own spelling)

    settings = settings or RegistrationSettings()
    start = time.perf_counter()
    if settings.threads > 0:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(settings.threads)
    if not isinstance(fixed, FixedImage):
        if fixed_affine is None:
            raise RegistrationError("register_rigid: a fixed array needs its affine")
        fixed = prepare_fixed(fixed, fixed_affine, fixed_mask, settings)
    fixed_image, mask_image, centre, points = fixed.image, fixed.mask, fixed.centre, fixed.points
    moving_image = _winsorized(
        _working_copy(_sitk_image(moving, moving_affine), settings.working_spacing_mm), settings.winsorize
    )

    transform = sitk.Euler3DTransform()
    transform.SetCenter([float(v) for v in centre])
    if initial is not None:
        init = np.asarray(initial, dtype=np.float64)
        transform.SetMatrix([float(v) for v in init[:3, :3].ravel()])
        transform.SetTranslation([float(v) for v in init[:3, 3] + init[:3, :3] @ centre - centre])

    method = _mattes_method(settings, mask_image)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=settings.learning_rate,
        minStep=settings.min_step,
        numberOfIterations=settings.iterations,
        relaxationFactor=settings.relaxation,
        gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(settings.shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(settings.smoothing_sigmas))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    # The figures are evaluated by a twin of ``method`` without the gradient filters: the same samples
    # and value, at a third of the time (the filters serve the optimizer's derivative, which no figure
    # needs; three evaluations cost a third of a registration with them).
    evaluator = _mattes_method(settings, mask_image)
    evaluator.MetricUseFixedImageGradientFilterOff()
    evaluator.MetricUseMovingImageGradientFilterOff()

    def metric(moving: Any) -> float:
        evaluator.SetInitialTransform(transform, inPlace=False)
        return float(evaluator.MetricEvaluate(fixed_image, moving))

    try:
        metric_start = metric(moving_image)
        method.Execute(fixed_image, moving_image)
        metric_final = metric(moving_image)
        metric_mirrored = float("nan")
        if settings.mirror_margin is not None:
            metric_mirrored = metric(_mirrored(moving_image, _matrix(transform), centre))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise RegistrationError(f"SimpleITK registration failed: {first}") from None
    matrix = _matrix(transform)
    # The figures and limits are about what the registration found beyond its start: with another
    # Frame of Reference the start (the heads' tops) holds the arbitrary offset between the two
    # frames, which is no patient motion.
    start_matrix = np.eye(4) if initial is None else np.asarray(initial, dtype=np.float64)
    result = RigidResult(
        matrix=matrix,
        translation_mm=float(displacement_mm(matrix, centre[None, :], start_matrix)[0]),
        rotation_deg=rotation_angle_deg(matrix @ np.linalg.inv(start_matrix)),
        edge_displacement_mm=(
            float(displacement_mm(matrix, points, start_matrix).max()) if len(points) else 0.0
        ),
        start_offset_mm=float(displacement_mm(start_matrix, centre[None, :])[0]),
        metric_mirrored=metric_mirrored,
        metric_start=metric_start,
        metric_final=metric_final,
        iterations=int(method.GetOptimizerIteration()),
        seconds=time.perf_counter() - start,
        stop=method.GetOptimizerStopConditionDescription()[:200],
    )
    check_result(result, settings)
    logger.debug(
        "rigid registration: %.2f mm, %.2f deg, edge %.2f mm, metric %.4f -> %.4f in %.2f s",
        result.translation_mm, result.rotation_deg, result.edge_displacement_mm,
        metric_start, metric_final, result.seconds,
    )  # fmt: skip
    return result


def _mattes_method(settings: RegistrationSettings, mask_image: Any) -> Any:
    """An ImageRegistrationMethod with the node's metric: Mattes MI on a seeded random share of the
    (masked) reference's voxels, linear interpolation."""
    import SimpleITK as sitk  # noqa: N813 (SimpleITK's own spelling)

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(settings.sampling_fraction, seed=17)
    if mask_image is not None:
        method.SetMetricFixedMask(mask_image)
    method.SetInterpolator(sitk.sitkLinear)
    return method


def _mirrored(moving_image: Any, matrix: npt.NDArray[np.float64], centre: npt.NDArray[np.float64]) -> Any:
    """``moving_image`` mirrored about the plane that the registration (``matrix``: reference ->
    moving) puts at the reference brain's mid-sagittal plane: through the brain's centre, normal to
    the reference's left-right axis (RAS x)."""
    import SimpleITK as sitk  # noqa: N813 (SimpleITK's own spelling)

    point = matrix[:3, :3] @ centre + matrix[:3, 3]
    normal = matrix[:3, :3] @ np.array([1.0, 0.0, 0.0])
    normal /= np.linalg.norm(normal)
    reflection = sitk.AffineTransform(3)
    reflection.SetMatrix([float(v) for v in (np.eye(3) - 2.0 * np.outer(normal, normal)).ravel()])
    reflection.SetCenter([float(v) for v in point])
    return sitk.Resample(moving_image, moving_image, reflection, sitk.sitkLinear, 0.0)


#: A registration that moved no point of the brain's edge further than this (mm) from its start has not
#: diverged, whatever the last decimals of the metric say (:func:`check_result`).
SETTLED_MM = 1.0


def check_result(result: RigidResult, settings: RegistrationSettings) -> None:
    """Set ``result.ok`` and ``result.reason`` by the limits of ``settings``."""
    reasons = []
    worse = result.metric_final - result.metric_start
    # A result within SETTLED_MM of its start everywhere on the brain's edge did not diverge: the
    # metric of two alignments that close differs by the optimizer's last steps between resolutions
    # (an unmoved T2 ended 0.0105 worse after 0.5 mm and failed; its study lost its sub-regions).
    settled = result.edge_displacement_mm <= SETTLED_MM and worse <= 5 * settings.max_metric_worsening
    if not np.isfinite(result.metric_final) or (worse > settings.max_metric_worsening and not settled):
        reasons.append(
            f"similarity got worse ({result.metric_start:.4f} -> {result.metric_final:.4f}, "
            "Mattes MI, lower is better)"
        )
    if result.translation_mm > settings.max_translation_mm:
        reasons.append(
            f"translation {result.translation_mm:.1f} mm > limit {settings.max_translation_mm:g} mm"
        )
    if result.rotation_deg > settings.max_rotation_deg:
        reasons.append(f"rotation {result.rotation_deg:.1f} deg > limit {settings.max_rotation_deg:g} deg")
    floor = settings.min_similarity
    if floor is not None and np.isfinite(result.metric_final) and -result.metric_final < floor:
        reasons.append(
            f"poor fit (similarity {-result.metric_final:.3f}, floor {floor:g}; Mattes MI, higher is "
            "better): the series hardly resembles the reference where it was placed"
        )
    margin = settings.mirror_margin
    if margin is not None and result.metric_mirrored < result.metric_final + margin:
        reasons.append(
            "poor or mirrored fit: the series fits about as well or better mirrored left-right "
            f"(MI {result.metric_final:.3f}, mirrored {result.metric_mirrored:.3f}): its pixels or "
            "orientation may be flipped"
        )
    result.ok = not reasons
    result.reason = "; ".join(reasons)


def apply_rigid(
    moving: npt.NDArray[Any],
    moving_affine: npt.NDArray[Any],
    matrix: npt.NDArray[Any],
    target_affine: npt.NDArray[Any],
    target_shape: tuple[int, int, int],
    box: tuple[slice, slice, slice] | None = None,
) -> npt.NDArray[np.float32]:
    """``moving`` resampled onto the target (reference) grid through ``matrix`` (reference -> moving).

    Trilinear, zero outside the moving series (:func:`converters.resample.resample_to_grid`). A zero
    background stays exactly zero (the voxels whose nearest moving voxel is 0 are set to 0): a
    skull-stripped series keeps its sharp edge instead of a rim of small values, which would change
    a normalisation over its non-zero voxels.

    ``box``: only these target voxels (slices with explicit start and stop, within ``target_shape``)
    are resampled; the rest of the output is zero. Resampling costs per output voxel (~0.8 s for a
    240x240x155 grid), so a caller that only reads the brain's box asks for that.
    """
    if box is not None:
        start = np.array([int(s.start) for s in box], dtype=np.float64)
        box_affine = np.asarray(target_affine, dtype=np.float64).copy()
        box_affine[:3, 3] += box_affine[:3, :3] @ start
        box_shape = (box[0].stop - box[0].start, box[1].stop - box[1].start, box[2].stop - box[2].start)
        whole = np.zeros(target_shape, dtype=np.float32)
        whole[box] = apply_rigid(moving, moving_affine, matrix, box_affine, box_shape)
        return whole
    # A target voxel t sits at world A_t t; its anatomy is at M A_t t in the moving series, whose
    # voxel index is A_m^-1 M A_t t: resample_to_grid with source affine M^-1 A_m does exactly that.
    source = np.linalg.inv(np.asarray(matrix, dtype=np.float64)) @ np.asarray(moving_affine, dtype=np.float64)
    out = np.asarray(resample_to_grid(moving, source, target_affine, target_shape, order=1), dtype=np.float32)
    zero = np.asarray(moving) == 0
    if zero.any():
        kept = resample_to_grid(~zero, source, target_affine, target_shape, order=0)
        out[~np.asarray(kept, dtype=bool)] = 0.0
    return out


def rigid_matrix(
    rotation_deg: tuple[float, float, float],
    translation_mm: tuple[float, float, float],
    centre: npt.NDArray[Any],
) -> npt.NDArray[np.float64]:
    """A 4x4 rigid matrix: rotations about x, y, z (degrees, applied in that order) about ``centre``,
    then a translation (mm). For making known misalignments (tests, benchmarks)."""
    from converters.resample import rotation

    rot = rotation("z", rotation_deg[2]) @ rotation("y", rotation_deg[1]) @ rotation("x", rotation_deg[0])
    centre = np.asarray(centre, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = np.asarray(translation_mm, dtype=np.float64) + centre - rot @ centre
    return out


def move_series(
    images: Mapping[str, npt.NDArray[Any]],
    affine: npt.NDArray[Any],
    motions: Mapping[str, tuple[tuple[float, float, float], tuple[float, float, float]]],
    centre: npt.NDArray[Any],
) -> tuple[dict[str, npt.NDArray[np.float32]], dict[str, npt.NDArray[np.float64]]]:
    """Images as if the patient had moved before each series of ``motions`` (a known misalignment).

    ``motions``: modality -> (rotations about x, y, z in degrees, translation in mm), about ``centre``.
    The moved image stays on its grid (same affine, as a scanner writes it) but shows the anatomy of
    reference point ``p`` at ``M p``; ``M`` (returned per modality) is what :func:`register_rigid` of
    the moved image onto the unmoved reference should find.
    """
    moved: dict[str, npt.NDArray[np.float32]] = {}
    truth: dict[str, npt.NDArray[np.float64]] = {}
    for modality, image in images.items():
        if modality not in motions:
            moved[modality] = np.asarray(image, dtype=np.float32)
            continue
        rotation_deg, translation_mm = motions[modality]
        matrix = rigid_matrix(rotation_deg, translation_mm, centre)
        shape = np.asarray(image).shape
        moved[modality] = apply_rigid(
            image, affine, np.linalg.inv(matrix), affine, (shape[0], shape[1], shape[2])
        )
        truth[modality] = matrix
    return moved, truth
