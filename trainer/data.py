"""Training data: patient-level split, preprocessed slices in memory, tumour oversampling, augmentation.

Cases come through :func:`converters.nifti.list_cases` (Decathlon Task01 folders, BraTS-style
folders, folders of those) and are preprocessed with the very function the node uses,
:func:`converters.preprocess.prepare_volume`, so training and inference see the same input.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset

from converters.case import Case
from converters.preprocess import Prepared, PreprocessSpec, channels_per_modality, prepare_volume
from trainer.exceptions import TrainerError

logger = logging.getLogger(__name__)

_PATIENT_PATTERNS = (
    re.compile(r"^(BraTS-[A-Za-z]+-\d+)-\d+$"),  # BraTS 2023: BraTS-GLI-00000-000 (patient-timepoint)
    # BraTS 2017-2020: BraTS19_CBICA_ASK_1; 2017 and 2018 spell it Brats17_/Brats18_ (Brats18_TCIA01_131_2)
    re.compile(r"^(BraTS(?:1[789]|20)_[A-Za-z0-9]+_[A-Za-z0-9]+)_\d+$", re.IGNORECASE),
    re.compile(r"^(brats_\d{4}_pat\d+)_\d+$", re.IGNORECASE),  # BraTS 2013 (DeepMedic naming)
)


def patient_key(case_id: str) -> str:
    """The patient a case belongs to (time points of one patient share it)."""
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(case_id)
        if match:
            return match.group(1)
    return case_id


def split_cases(
    case_ids: Sequence[str], val_fraction: float, seed: int, folds: int = 0, fold: int = 0
) -> dict[str, Any]:
    """Seeded patient-level split: all cases of one patient land on the same side.

    The patients are shuffled by ``seed``. Without ``folds`` the first ``val_fraction`` of them
    validate. With ``folds`` K (cross-validation) they are cut into K parts of nearly equal size and
    part ``fold`` validates: the K runs of one seed validate on every patient exactly once.

    Returns
    -------
    dict
        ``{"seed", "val_fraction", "train": [ids], "val": [ids]}`` (ids sorted), with ``"folds"`` and
        ``"fold"`` when ``folds`` is given.
    """
    if len(set(case_ids)) != len(case_ids):
        raise TrainerError(
            "case ids are not unique: " + ", ".join(sorted({c for c in case_ids if case_ids.count(c) > 1}))
        )
    if not 0.0 <= val_fraction < 1.0:
        raise TrainerError(f"validation fraction {val_fraction} must be in [0, 1)")
    patients = sorted({patient_key(c) for c in case_ids})
    order = np.random.default_rng(seed).permutation(len(patients))
    if folds:
        if not 0 <= fold < folds:
            raise TrainerError(f"fold {fold} must be 0 to {folds - 1} of {folds} folds")
        if folds > len(patients):
            raise TrainerError(f"{len(patients)} patients cannot be cut into {folds} folds")
        chosen = np.array_split(order, folds)[fold]
    else:
        n_val = round(len(patients) * val_fraction)
        if val_fraction > 0 and n_val == 0 and len(patients) > 1:
            n_val = 1
        if n_val >= len(patients):
            raise TrainerError(
                f"{len(patients)} patients cannot be split with validation fraction {val_fraction}"
            )
        chosen = order[:n_val]
    val_patients = {patients[i] for i in chosen}
    val = sorted(c for c in case_ids if patient_key(c) in val_patients)
    train = sorted(c for c in case_ids if patient_key(c) not in val_patients)
    out: dict[str, Any] = {"seed": seed, "val_fraction": val_fraction, "train": train, "val": val}
    return {**out, "folds": folds, "fold": fold} if folds else out


def split_by_completeness(
    held: Mapping[str, Sequence[str]],
    modalities: Sequence[str],
    optional: Sequence[str],
    val_fraction: float,
    seed: int,
    folds: int = 0,
    fold: int = 0,
) -> dict[str, Any]:
    """A :func:`split_cases` split whose validation cases hold every modality.

    Parameters
    ----------
    held:
        Case id -> the modalities the case holds.
    modalities, optional:
        The model's channels and those of them a case may lack.
    val_fraction, seed, folds, fold:
        As for :func:`split_cases`, applied to the complete cases only.

    Returns
    -------
    dict
        :func:`split_cases`'s dict; cases lacking only optional modalities are added to ``train`` and
        listed under ``"incomplete"``; cases lacking a required modality under ``"skipped"``. With no
        optional modality this is :func:`split_cases` over the complete cases.
    """
    complete: list[str] = []
    incomplete: list[str] = []
    skipped: list[str] = []
    for case_id, mods in held.items():
        try:
            missing = missing_modalities(mods, modalities, optional)
        except TrainerError:
            skipped.append(case_id)
            continue
        (incomplete if missing else complete).append(case_id)
    if skipped:
        logger.warning(
            "%d case(s) lack a required modality of %s and are not used: %s",
            len(skipped),
            ", ".join(modalities),
            ", ".join(sorted(skipped)),
        )
    split = split_cases(complete, val_fraction, seed, folds, fold)
    val_patients = {patient_key(c) for c in split["val"]}
    leaking = sorted(c for c in incomplete if patient_key(c) in val_patients)
    if leaking:
        logger.warning("incomplete cases of validation patients not trained on: %s", ", ".join(leaking))
    extra = sorted(c for c in incomplete if c not in leaking)
    if extra or skipped:
        split = {
            **split,
            "train": sorted(split["train"] + extra),
            "incomplete": extra,
            "skipped": sorted(skipped + leaking),
        }
    return split


def task_target(label: npt.NDArray[Any], task: str) -> npt.NDArray[np.uint8]:
    """The training target of ``task`` from Decathlon labels: whole tumour {0, 1} or labels 0-3."""
    if task == "whole_tumor":
        return (np.asarray(label) > 0).astype(np.uint8)
    return np.asarray(label).astype(np.uint8)


@dataclass
class PreparedCase:
    """One case on the network grid, with its original-grid label for 3D evaluation."""

    case_id: str
    prepared: Prepared
    target_planes: npt.NDArray[np.uint8]
    target: npt.NDArray[np.uint8]
    spacing: tuple[float, float, float]


def missing_modalities(held: Sequence[str], modalities: Sequence[str], optional: Sequence[str]) -> list[str]:
    """The ``modalities`` a case holding ``held`` lacks.

    Raises
    ------
    TrainerError
        A lacking modality is not one of ``optional`` (the case cannot be used).
    """
    missing = [m for m in modalities if m not in held]
    required = [m for m in missing if m not in optional]
    if required:
        raise TrainerError(
            f"lacks {', '.join(required)} (required: {', '.join(m for m in modalities if m not in optional)})"
        )
    return missing


def zero_missing_channels(
    slices: npt.NDArray[np.float32], held: Sequence[str], modalities: Sequence[str], per_modality: int = 1
) -> npt.NDArray[np.float32]:
    """Slices (S, len(held) * n, H, W) widened to (S, len(modalities) * n, H, W), absent channels all
    zero; n = ``per_modality``, each modality's channels (its context slices, in a row).

    Zero is the brain's mean after z-scoring, which is also what channel dropout writes during
    training, so a model trained with dropout has seen such input.
    """
    n = per_modality
    out = np.zeros((slices.shape[0], len(modalities) * n, *slices.shape[2:]), dtype=np.float32)
    for i, name in enumerate(held):
        at = list(modalities).index(name) * n
        out[:, at : at + n] = slices[:, i * n : (i + 1) * n]
    return out


def prepare_case(
    case: Case,
    preprocessing: Mapping[str, Any],
    modalities: Sequence[str],
    task: str,
    optional: Sequence[str] = (),
) -> PreparedCase:
    """Preprocess a labelled case as the model card says.

    A case lacking one of the ``optional`` modalities gets that channel as zeros (see
    :func:`zero_missing_channels`); its label map is still complete, so the loss stays right.

    Raises
    ------
    TrainerError
        The case has no label map, or lacks a modality that is not optional.
    """
    if case.label is None:
        raise TrainerError(f"case {case.case_id} ({case.source}) has no label map; training needs labels")
    try:
        missing = missing_modalities(list(case.images), modalities, optional)
    except TrainerError as exc:
        raise TrainerError(f"case {case.case_id} ({case.source}) {exc}") from None
    held = [m for m in modalities if m not in missing]
    prepared = prepare_volume(case.images, case.affine, preprocessing, held)
    if missing:
        per_modality = channels_per_modality(PreprocessSpec.from_card(preprocessing).context_slices)
        prepared = replace(
            prepared, slices=zero_missing_channels(prepared.slices, held, modalities, per_modality)
        )
    target = task_target(case.label, task)
    return PreparedCase(case.case_id, prepared, prepared.crop_label(target), target, case.spacing)


@dataclass
class SliceArrays:
    """All training slices of a split, stacked: images (S, C, H, W), targets (S, H, W)."""

    images: npt.NDArray[np.float32]
    targets: npt.NDArray[np.uint8]
    case_index: npt.NDArray[np.int64]
    case_ids: list[str]

    @classmethod
    def from_cases(cls, cases: Sequence[PreparedCase]) -> SliceArrays:
        """Stack the slices of ``cases``."""
        if not cases:
            raise TrainerError("no case to take training slices from")
        return cls(
            images=np.concatenate([c.prepared.slices for c in cases]),
            targets=np.concatenate([c.target_planes for c in cases]),
            case_index=np.concatenate(
                [np.full(len(c.target_planes), i, np.int64) for i, c in enumerate(cases)]
            ),
            case_ids=[c.case_id for c in cases],
        )

    @property
    def tumour(self) -> npt.NDArray[np.bool_]:
        """Per slice: whether it holds any tumour voxel."""
        return np.asarray(self.targets.reshape(len(self.targets), -1).max(axis=1) > 0)


def epoch_plan(
    tumour: npt.NDArray[np.bool_], n: int, tumour_fraction: float, seed: int, epoch: int
) -> npt.NDArray[np.int64]:
    """Slice indices for one epoch, drawn with replacement so that about ``tumour_fraction`` hold tumour.

    With ``tumour_fraction`` >= 1 only tumour slices are drawn; with ``tumour_fraction`` <= 0 or no
    tumour slice, slices are drawn uniformly.
    """
    rng = np.random.default_rng([seed, epoch])
    weights = np.ones(len(tumour), dtype=np.float64)
    n_t = int(tumour.sum())
    if tumour_fraction >= 1 and n_t > 0:
        weights[~tumour] = 0.0
    elif 0 < tumour_fraction < 1 and 0 < n_t < len(tumour):
        weights[tumour] = tumour_fraction / n_t
        weights[~tumour] = (1 - tumour_fraction) / (len(tumour) - n_t)
    weights /= weights.sum()
    return rng.choice(len(tumour), size=n, replace=True, p=weights).astype(np.int64)


def augment(
    image: npt.NDArray[np.float32], target: npt.NDArray[np.uint8], rng: np.random.Generator
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """Random flips, 90-degree rotations (180 only for non-square slices), intensity scale and shift.

    The intensity change touches only non-zero (brain) pixels, so the background stays zero.
    """
    if rng.random() < 0.5:
        image, target = image[:, ::-1], target[::-1]
    if rng.random() < 0.5:
        image, target = image[:, :, ::-1], target[:, ::-1]
    k = int(rng.integers(4)) if image.shape[1] == image.shape[2] else 2 * int(rng.integers(2))
    if k:
        image, target = np.rot90(image, k, axes=(1, 2)), np.rot90(target, k)
    scale = rng.uniform(0.9, 1.1, size=(image.shape[0], 1, 1)).astype(np.float32)
    shift = rng.uniform(-0.1, 0.1, size=(image.shape[0], 1, 1)).astype(np.float32)
    image = np.where(image != 0, image * scale + shift, 0).astype(np.float32)
    return np.ascontiguousarray(image), np.ascontiguousarray(target)


def drop_channels(
    image: npt.NDArray[np.float32],
    droppable: Sequence[Sequence[int]],
    prob: float,
    rng: np.random.Generator,
) -> npt.NDArray[np.float32]:
    """With probability ``prob``, ``image`` (C, H, W) with a random non-empty subset of ``droppable`` zeroed.

    ``droppable`` holds channel groups, one per optional modality (its slice and, with context slices,
    its neighbours): a group is zeroed whole, as a missing series is at inference. The subset size is
    uniform in 1..len(droppable), then the groups uniform among subsets of that size. Channels in no
    group (FLAIR) are never touched; ``image`` is not changed.
    """
    if prob <= 0 or not droppable or rng.random() >= prob:
        return image
    k = int(rng.integers(1, len(droppable) + 1))
    chosen = rng.choice(np.arange(len(droppable), dtype=np.int64), size=k, replace=False)
    out = image.copy()
    out[[c for g in chosen for c in droppable[int(g)]]] = 0.0
    return out


class SliceDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """The slices of one epoch (an :func:`epoch_plan`), optionally augmented.

    Parameters
    ----------
    arrays:
        The stacked training slices.
    plan:
        Indices into ``arrays`` for this epoch.
    augment_seed:
        Seed for augmentation, or None for none (validation).
    droppable:
        Channel groups that channel dropout may zero, one per optional modality (with augmentation only).
    dropout:
        Per slice, the probability of zeroing a random non-empty subset of ``droppable``.
    """

    def __init__(
        self,
        arrays: SliceArrays,
        plan: npt.NDArray[np.int64],
        augment_seed: int | None,
        droppable: Sequence[Sequence[int]] = (),
        dropout: float = 0.0,
    ) -> None:
        self.arrays = arrays
        self.plan = plan
        self.augment_seed = augment_seed
        self.droppable = [tuple(g) for g in droppable]
        self.dropout = dropout

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = int(self.plan[i])
        image, target = self.arrays.images[idx], self.arrays.targets[idx]
        if self.augment_seed is not None:
            rng = np.random.default_rng([self.augment_seed, i])
            image, target = augment(image, target, rng)
            image = drop_channels(image, self.droppable, self.dropout, rng)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(target.astype(np.int64))


def load_prepared(
    refs: Sequence[Any],
    preprocessing: Mapping[str, Any],
    modalities: Sequence[str],
    task: str,
    on_case: Callable[[str], None] | None = None,
    optional: Sequence[str] = (),
    slice_axes: Sequence[int] | None = None,
) -> list[PreparedCase]:
    """Load and preprocess every case of ``refs`` (``CaseRef`` objects from converters.nifti).

    ``optional`` modalities a case lacks become zero channels (:func:`prepare_case`). ``slice_axes``:
    each case cut into slices along each of these axes of the model's grid (:func:`prepare_views`);
    None: along the card's ``slice_axis`` only.
    """
    out = []
    for ref in refs:
        case = ref.load()
        out += prepare_views(case, preprocessing, modalities, task, optional, slice_axes)
        if on_case is not None:
            on_case(ref.case_id)
    return out


def prepare_views(
    case: Case,
    preprocessing: Mapping[str, Any],
    modalities: Sequence[str],
    task: str,
    optional: Sequence[str] = (),
    slice_axes: Sequence[int] | None = None,
) -> list[PreparedCase]:
    """:func:`prepare_case` once per axis of ``slice_axes`` (None: the card's ``slice_axis``): a model
    that will see sagittal and coronal slices at the node (card ``preprocessing.views`` 3) learns from
    them too."""
    axes = [int(preprocessing.get("slice_axis", 2))] if slice_axes is None else list(slice_axes)
    return [
        prepare_case(case, {**preprocessing, "slice_axis": axis}, modalities, task, optional) for axis in axes
    ]


def median_spacing(refs: Sequence[Any]) -> list[float]:
    """Median voxel spacing (mm) of the cases' NIfTI headers, read without loading the voxels."""
    import nibabel as nib

    spacings = []
    for ref in refs:
        path = Path(ref.path)
        first = path if path.is_file() else next(iter(sorted(path.glob("*.nii*"))), None)
        if first is None:
            continue
        image: Any = nib.load(str(first))
        zooms = image.header.get_zooms()
        ras = [0.0, 0.0, 0.0]
        for voxel_axis, (ras_axis, _) in enumerate(nib.orientations.io_orientation(image.affine)[:3]):
            ras[int(ras_axis)] = float(zooms[voxel_axis])
        spacings.append(ras)
    if not spacings:
        return [1.0, 1.0, 1.0]
    return [float(v) for v in np.median(np.asarray(spacings), axis=0)]
