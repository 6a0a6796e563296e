"""Turn a BraTS case into what a scanner sends, before it is sliced for training.

BraTS images are skull-stripped, registered, 1 mm isotropic, bias-corrected and clean. A PACS sends
4-6 mm slices in any of three planes, a lower in-plane resolution, a bias field, noise, other
contrast, a tilted head. The node undoes what it can (brain extraction, resampling to 1 mm in world
space, normalisation inside the brain); this module makes the model tolerate the rest, by degrading
each training case in 3D with MONAI's maintained transforms:

=========================  ===================================================================
degradation                MONAI transform (parameters)
=========================  ===================================================================
thick slices               ``Resize`` down along one random axis to 3-6 mm (area), then back
                           to the 1 mm grid (trilinear): the slices the node resamples to 1 mm
lower in-plane resolution  ``RandSimulateLowResolution`` (zoom 0.5-1.0)
bias field                 ``RandBiasField`` (degree 3, coefficients 0.1-0.4)
noise                      ``RandRicianNoise`` (std 0-4 % of the brain's 99th percentile, on
                           intensities shifted non-negative: the noise is a magnitude)
gamma and contrast         ``RandAdjustContrast`` (gamma 0.7-1.5)
small rotations            ``RandAffined`` (±10° about each axis; label by nearest neighbour)
=========================  ===================================================================

The brain mask (BraTS: the non-zero voxels) is rotated with the image and, like the node's brain
extraction, decides what is brain: outside it the image is set to zero before normalisation, as the
node does. The label keeps its 1 mm grid: the model learns the true tumour from a degraded image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from converters.case import Case


@dataclass(frozen=True)
class ScannerAugmentation:
    """Ranges of the degradations (see the module docstring); ``prob`` is per case and epoch."""

    prob: float = 0.8
    slice_mm: tuple[float, float] = (3.0, 6.0)
    thick_slice_prob: float = 0.7
    low_res_prob: float = 0.3
    bias_prob: float = 0.5
    bias_coeff: tuple[float, float] = (0.1, 0.4)
    noise_prob: float = 0.5
    noise_std: tuple[float, float] = (0.0, 0.04)
    gamma_prob: float = 0.5
    gamma: tuple[float, float] = (0.7, 1.5)
    rotate_prob: float = 0.5
    rotate_deg: float = 10.0


def degrade_case(case: Case, rng: np.random.Generator, aug: ScannerAugmentation | None = None) -> Case:
    """A degraded copy of ``case`` (images and label on the same 1 mm grid); ``case`` is not changed.

    With probability ``1 - aug.prob`` the case comes back as it is.
    """
    aug = aug or ScannerAugmentation()
    if rng.random() >= aug.prob:
        return case
    import torch
    from monai.transforms import (
        RandAdjustContrast,
        RandAffined,
        RandBiasField,
        RandRicianNoise,
        RandSimulateLowResolution,
        Resize,
    )
    modalities = list(case.images)
    image = np.stack([np.asarray(case.images[m], dtype=np.float32) for m in modalities])
    brain = (image != 0).any(axis=0)
    label = np.zeros(brain.shape, np.float32) if case.label is None else case.label.astype(np.float32)
    seed = int(rng.integers(2**31 - 1))

    if rng.random() < aug.rotate_prob:
        rad = np.deg2rad(aug.rotate_deg)
        rotate = RandAffined(
            keys=["image", "mask", "label"],
            prob=1.0,
            rotate_range=(rad, rad, rad),
            mode=("bilinear", "nearest", "nearest"),
            padding_mode="zeros",
        )
        rotate.set_random_state(seed)
        out: Mapping[Any, Any] = rotate(
            {"image": image, "mask": brain[None].astype(np.float32), "label": label[None]}
        )
        image = np.asarray(out["image"], dtype=np.float32)
        brain = np.asarray(out["mask"])[0] > 0.5
        label = np.asarray(out["label"])[0]

    if rng.random() < aug.thick_slice_prob:
        axis = int(rng.integers(3))
        spacing = float(case.spacing[axis])
        factor = float(rng.uniform(*aug.slice_mm)) / max(spacing, 1e-3)
        shape = list(image.shape[1:])
        small = list(shape)
        small[axis] = max(2, round(shape[axis] / factor))
        thick = Resize(small, mode="area")(torch.from_numpy(image))
        image = np.asarray(Resize(shape, mode="trilinear")(thick), dtype=np.float32)

    for flip, transform in (
        (aug.low_res_prob, RandSimulateLowResolution(prob=1.0, zoom_range=(0.5, 1.0))),
        (aug.bias_prob, RandBiasField(degree=3, coeff_range=aug.bias_coeff, prob=1.0)),
        (aug.gamma_prob, RandAdjustContrast(prob=1.0, gamma=aug.gamma)),
    ):
        if rng.random() < flip:
            transform.set_random_state(int(rng.integers(2**31 - 1)))
            image = _positive(np.asarray(transform(torch.from_numpy(_positive(image))), dtype=np.float32))

    if rng.random() < aug.noise_prob and brain.any():
        # Rician noise is a magnitude, sqrt((x + n1)^2 + n2^2): a signed (z-scored) image would fold
        # its negative half onto the positive one, so it is shifted non-negative as for the steps above.
        image = _positive(image)
        top = float(np.percentile(image[:, brain], 99)) or 1.0
        std = float(rng.uniform(*aug.noise_std)) * top
        noise = RandRicianNoise(prob=1.0, std=std, relative=False, sample_std=False)
        noise.set_random_state(int(rng.integers(2**31 - 1)))
        image = np.asarray(noise(image), dtype=np.float32)

    image = np.where(brain[None], image, 0.0).astype(np.float32)
    images = {m: image[i] for i, m in enumerate(modalities)}
    out_label = None if case.label is None else np.rint(label).astype(case.label.dtype)
    return Case(
        case_id=case.case_id,
        images=images,
        affine=case.affine,
        label=out_label,
        source=case.source,
        extra={**case.extra, "scanner_augmented": "yes"},
    )


def _positive(image: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Intensities shifted to be non-negative (bias field, gamma and Rician noise act on magnitudes)."""
    low = float(image.min())
    return image - low if low < 0 else image
