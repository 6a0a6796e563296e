"""Synthetic brain-tumour cases: a head-like phantom in four MR contrasts, deterministic by seed.

The phantom is skull-stripped like BraTS (background exactly 0): an ellipsoidal brain of white matter
inside a grey-matter shell, two lateral ventricles of CSF, and one tumour made of an irregular
edematous region around a necrotic/non-enhancing core wrapped in an enhancing rim. Intensities follow
the usual relative order of each contrast (values are integers, like BraTS):

========== ===== ===== ===== ====== ======= =========
contrast    WM    GM    CSF  edema  core    enh. rim
========== ===== ===== ===== ====== ======= =========
FLAIR       550   700   120  1250    700    1000
T1          800   600   250   500    350     650
T1GD        800   600   250   500    350    1400
T2          650   900  1900  1450   1650    1000
========== ===== ===== ===== ====== ======= =========

A smooth multiplicative bias field and Gaussian noise make each case a little different; the labels
are in the Decathlon convention (1 edema, 2 non-enhancing/necrotic core, 3 enhancing).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from converters.case import MODALITIES, Case
from converters.nifti import write_dataset_json, write_decathlon_case

logger = logging.getLogger(__name__)

#: Tissue intensities per contrast: (WM, GM, CSF, edema, core, enhancing rim).
TISSUE_INTENSITY: dict[str, tuple[float, float, float, float, float, float]] = {
    "FLAIR": (550.0, 700.0, 120.0, 1250.0, 700.0, 1000.0),
    "T1": (800.0, 600.0, 250.0, 500.0, 350.0, 650.0),
    "T1GD": (800.0, 600.0, 250.0, 500.0, 350.0, 1400.0),
    "T2": (650.0, 900.0, 1900.0, 1450.0, 1650.0, 1000.0),
}
_WM, _GM, _CSF, _EDEMA, _CORE, _ENH = range(6)

#: Physical size of the phantom's field of view in mm (X, Y, Z), whatever the grid shape.
FIELD_OF_VIEW_MM = (192.0, 192.0, 150.0)


def _grid(shape: tuple[int, int, int]) -> tuple[npt.NDArray[np.float64], ...]:
    """Normalised coordinates in [-1, 1] along each axis."""
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    return tuple(np.meshgrid(*axes, indexing="ij"))


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int, int], sigma: float
) -> npt.NDArray[np.float64]:
    """Low-frequency noise with unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="wrap")
    std = float(field.std())
    return field / std if std > 0 else field


def _tissue_map(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[npt.NDArray[np.int8], ...]:
    """Tissue class per voxel (-1 outside, else one of WM..ENH) and the Decathlon label map."""
    x, y, z = _grid(shape)
    ax, ay, az = rng.uniform(0.78, 0.88), rng.uniform(0.85, 0.95), rng.uniform(0.78, 0.9)
    radius = np.sqrt((x / ax) ** 2 + (y / ay) ** 2 + (z / az) ** 2)
    wobble = 0.03 * _smooth_noise(rng, shape, sigma=max(shape) / 8)
    brain = radius + wobble < 1.0
    tissue = np.full(shape, -1, dtype=np.int8)
    tissue[brain] = _WM
    tissue[brain & (radius + wobble > 0.82)] = _GM
    for side in (-1.0, 1.0):
        vent = ((x - side * 0.12) / 0.08) ** 2 + ((y + 0.05) / 0.3) ** 2 + ((z - 0.1) / 0.22) ** 2 < 1.0
        tissue[vent & brain] = _CSF

    # The tumour: centre inside one hemisphere, away from the midline and the surface.
    side = rng.choice([-1.0, 1.0])
    centre = np.array([side * rng.uniform(0.25, 0.45), rng.uniform(-0.35, 0.35), rng.uniform(-0.25, 0.35)])
    r_core = rng.uniform(0.10, 0.16)
    r_enh = r_core + rng.uniform(0.05, 0.08)
    r_edema = r_enh + rng.uniform(0.12, 0.25)
    dist = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    irregular = dist * (1.0 + 0.12 * _smooth_noise(rng, shape, sigma=max(shape) / 10))
    label = np.zeros(shape, dtype=np.int8)
    for limit, cls, lab in ((r_edema, _EDEMA, 1), (r_enh, _ENH, 3), (r_core, _CORE, 2)):
        region = brain & (irregular < limit)
        tissue[region] = cls
        label[region] = lab
    return tissue, label


def make_synthetic_case(seed: int, shape: tuple[int, int, int] = (64, 64, 40)) -> Case:
    """A deterministic phantom case in the four Task01 contrasts.

    Parameters
    ----------
    seed:
        Seed of the random generator; the same seed gives the same case bit for bit.
    shape:
        Voxel grid (X, Y, Z); the field of view is :data:`FIELD_OF_VIEW_MM` whatever the shape.

    Returns
    -------
    Case
        ``case_id`` ``synthetic_<seed>``, float32 integer-valued images (0 outside the brain),
        uint8 labels in the Decathlon convention, a diagonal RAS+ affine centred on the grid.
    """
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"synthetic case shape {shape!r}: need three sizes of at least 8")
    rng = np.random.default_rng(seed)
    tissue, label = _tissue_map(rng, shape)
    inside = tissue >= 0
    bias = np.exp(0.08 * _smooth_noise(rng, shape, sigma=max(shape) / 4))
    images: dict[str, npt.NDArray[np.float32]] = {}
    for modality in MODALITIES:
        table = np.asarray(TISSUE_INTENSITY[modality])
        clean = np.where(inside, table[np.clip(tissue, 0, None)], 0.0)
        clean = ndimage.gaussian_filter(clean, sigma=0.6)  # partial volume at tissue edges
        noisy = clean * bias * rng.uniform(0.9, 1.1) + rng.normal(0.0, 20.0, shape)
        image = np.where(inside, np.clip(np.rint(noisy), 1.0, None), 0.0)
        images[modality] = image.astype(np.float32)
    spacing = np.asarray(FIELD_OF_VIEW_MM) / np.asarray(shape, dtype=np.float64)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -spacing * (np.asarray(shape) - 1) / 2.0
    case = Case(
        case_id=f"synthetic_{seed}",
        images=images,
        affine=affine,
        label=label.astype(np.uint8),
    )
    case.extra["layout"] = "synthetic"
    return case


def write_synthetic_task01(
    out_dir: Path, n_cases: int, seed: int, shape: tuple[int, int, int] = (64, 64, 40)
) -> Path:
    """Write a complete Decathlon Task01 folder of synthetic cases.

    Parameters
    ----------
    out_dir:
        The folder to fill (created): ``dataset.json``, ``imagesTr/BRATS_001.nii.gz`` ... (4D, channels
        FLAIR, T1w, T1gd, T2w) and ``labelsTr/BRATS_001.nii.gz`` ...
    n_cases:
        Number of cases.
    seed:
        Base seed; case ``i`` (from 0) uses seed ``seed * 100003 + i``, so different bases give
        different cases and the folder is reproducible.
    shape:
        Voxel grid of each case.

    Returns
    -------
    Path
        ``out_dir``.
    """
    if n_cases < 1:
        raise ValueError(f"n_cases={n_cases}: need at least one case")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for index in range(n_cases):
        case = make_synthetic_case(seed * 100003 + index, shape)
        name = f"BRATS_{index + 1:03d}"
        write_decathlon_case(case, out_dir, name)
        names.append(name)
    write_dataset_json(out_dir, names, description=f"segnode synthetic phantom cases, seed {seed}")
    logger.info("wrote %d synthetic cases (seed %d, shape %s) to %s", n_cases, seed, shape, out_dir)
    return out_dir
