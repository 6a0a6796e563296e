"""The :class:`Case` type: one subject's co-registered modalities and label map."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

#: Canonical modality names, in the channel order of the Decathlon Task01 images.
MODALITIES: tuple[str, ...] = ("FLAIR", "T1", "T1GD", "T2")

#: Decathlon Task01 label convention.
DECATHLON_LABELS: dict[int, str] = {
    0: "background",
    1: "edema",
    2: "non-enhancing tumour",
    3: "enhancing tumour",
}


@dataclass
class Case:
    """One subject: modality name -> 3D image, a shared affine and an optional label map.

    Attributes
    ----------
    case_id:
        Identifier of the case (folder or file stem), never a patient name.
    images:
        Modality name (one of :data:`MODALITIES`) -> float32 array of shape (X, Y, Z),
        all in the canonical RAS+ voxel orientation (``nibabel.as_closest_canonical``).
    affine:
        4x4 float64 matrix mapping voxel indices (i, j, k) to RAS+ millimetres.
    label:
        uint8 array of shape (X, Y, Z) in the Decathlon convention (:data:`DECATHLON_LABELS`),
        or ``None`` for an unlabelled case.
    source:
        Folder or file the case was read from.
    """

    case_id: str
    images: dict[str, npt.NDArray[np.float32]]
    affine: npt.NDArray[np.float64]
    label: npt.NDArray[np.uint8] | None = None
    source: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel grid shape (X, Y, Z) shared by every modality."""
        first = next(iter(self.images.values()))
        return (int(first.shape[0]), int(first.shape[1]), int(first.shape[2]))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k, from the affine's column norms."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    def whole_tumor(self) -> npt.NDArray[np.uint8]:
        """Binary whole-tumour mask (every label above zero)."""
        if self.label is None:
            raise ValueError(f"case {self.case_id} has no label map")
        return (self.label > 0).astype(np.uint8)
