"""NIfTI cases: BraTS-style case folders and Medical Segmentation Decathlon Task01 folders.

Every reader returns a :class:`~converters.case.Case` in one convention: images as float32 in the
closest canonical RAS+ voxel order (``nibabel.as_closest_canonical``), labels as uint8 in the
Decathlon convention (0 background, 1 edema, 2 non-enhancing/necrotic core, 3 enhancing).

Layouts read
------------
* BraTS 2019-2021: ``<id>_flair/_t1/_t1ce/_t2/_seg.nii.gz``, labels {0, 1 core, 2 edema, 4 enhancing}.
* BraTS 2023: ``<id>-t2f/-t1n/-t1c/-t2w/-seg.nii.gz``, labels {0, 1 core, 2 edema, 3 enhancing}.
* BraTS 2013 (pre-normalised): ``Flair_subtrMeanDivStd.nii.gz``, ``T1c_subtrMeanDivStd.nii.gz``,
  ``OTMultiClass.nii.gz`` (1 necrosis, 2 edema, 3 non-enhancing, 4 enhancing) and
  ``brainmask.nii.gz``; voxels outside the brain mask are set to exactly 0 and
  ``case.extra["normalized"] == "zscore"``.
* Decathlon Task01: ``dataset.json``, ``imagesTr/*.nii.gz`` (4D, channels FLAIR, T1w, T1gd, T2w),
  ``labelsTr/*.nii.gz`` (already in the Decathlon convention).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt

from converters.case import DECATHLON_LABELS, MODALITIES, Case
from converters.exceptions import HoldoutDataError, InvalidCaseError

logger = logging.getLogger(__name__)

#: Affines of one case may differ by this much (mm) and still be the same grid.
AFFINE_TOLERANCE_MM = 1e-3

_NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class _Layout:
    """A BraTS naming convention: file tag -> modality, label tag, label mapping."""

    name: str
    separator: str
    modalities: dict[str, str]
    label_tag: str
    label_map: dict[int, int]


#: BraTS 2019-2021: 1 necrotic/non-enhancing core, 2 edema, 4 enhancing.
BRATS2021 = _Layout(
    name="brats2021",
    separator="_",
    modalities={"flair": "FLAIR", "t1": "T1", "t1ce": "T1GD", "t2": "T2"},
    label_tag="seg",
    label_map={0: 0, 1: 2, 2: 1, 4: 3},
)
#: BraTS 2023: 1 non-enhancing core, 2 surrounding FLAIR hyperintensity, 3 enhancing.
BRATS2023 = _Layout(
    name="brats2023",
    separator="-",
    modalities={"t2f": "FLAIR", "t1n": "T1", "t1c": "T1GD", "t2w": "T2"},
    label_tag="seg",
    label_map={0: 0, 1: 2, 2: 1, 3: 3},
)
#: BraTS 2013 folders: exact file names, 1 necrosis, 2 edema, 3 non-enhancing, 4 enhancing.
BRATS2013_FILES = {"FLAIR": "Flair_subtrMeanDivStd.nii.gz", "T1GD": "T1c_subtrMeanDivStd.nii.gz"}
BRATS2013_LABEL = "OTMultiClass.nii.gz"
BRATS2013_MASK = "brainmask.nii.gz"
BRATS2013_LABEL_MAP = {0: 0, 1: 2, 2: 1, 3: 2, 4: 3}
DECATHLON_LABEL_MAP = {k: k for k in DECATHLON_LABELS}

#: Decathlon dataset.json modality names (lower case) -> canonical names.
_DECATHLON_CHANNEL_NAMES = {
    "flair": "FLAIR",
    "t1w": "T1",
    "t1": "T1",
    "t1gd": "T1GD",
    "t2w": "T2",
    "t2": "T2",
}


# ---------------------------------------------------------------------------------------------
# Low-level readers
# ---------------------------------------------------------------------------------------------


def _load_nifti(path: Path) -> nib.Nifti1Image:
    """Open ``path`` as NIfTI (header only), or raise InvalidCaseError naming it."""
    if not path.is_file():
        raise InvalidCaseError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for bad files
        raise InvalidCaseError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InvalidCaseError(f"{path}: not a NIfTI image (got {type(img).__name__})")
    return img


def _canonical_data(
    path: Path, img: nib.Nifti1Image
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Voxel data (scaled, float64) and affine of ``img`` in closest canonical RAS+ order."""
    try:
        canon = nib.as_closest_canonical(img)
        data = np.asarray(canon.get_fdata(dtype=np.float64))
    except Exception as exc:  # truncated gzip, bad header, ...
        raise InvalidCaseError(f"{path}: cannot read voxel data ({type(exc).__name__}: {exc})") from exc
    return data, np.asarray(canon.affine, dtype=np.float64)


def _read_image(path: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """One 3D image as float32 in canonical RAS+ with its affine."""
    img = _load_nifti(path)
    if len(img.shape) != 3:
        raise InvalidCaseError(f"{path}: expected a 3D image, got shape {tuple(img.shape)}")
    data, affine = _canonical_data(path, img)
    if not np.all(np.isfinite(data)):
        raise InvalidCaseError(f"{path}: image holds NaN or infinite values")
    return data.astype(np.float32), affine


def _read_label(path: Path, mapping: dict[int, int]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64]]:
    """A label map in canonical RAS+, mapped to the Decathlon convention with ``mapping``."""
    img = _load_nifti(path)
    shape = tuple(img.shape)
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
    elif len(shape) != 3:
        raise InvalidCaseError(f"{path}: expected a 3D label map, got shape {shape}")
    data, affine = _canonical_data(path, img)
    rounded = np.rint(data)
    if not np.allclose(data, rounded, atol=1e-3):
        raise InvalidCaseError(
            f"{path}: label map holds non-integer values (e.g. {data[data != rounded][0]!r})"
        )
    values = rounded.astype(np.int64)
    present = {int(v) for v in np.unique(values)}
    unknown = sorted(present - set(mapping))
    if unknown:
        raise InvalidCaseError(
            f"{path}: label values {unknown} are not in the expected set {sorted(mapping)}"
        )
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[values], affine


def _check_grid(
    path: Path,
    shape: tuple[int, ...],
    affine: npt.NDArray[np.float64],
    ref: tuple[Path, tuple[int, ...], npt.NDArray[np.float64]],
) -> None:
    """Refuse a file whose grid disagrees with the case's first file."""
    ref_path, ref_shape, ref_affine = ref
    if tuple(shape[:3]) != tuple(ref_shape[:3]):
        raise InvalidCaseError(
            f"{path}: shape {tuple(shape[:3])} disagrees with {ref_path.name} shape {tuple(ref_shape[:3])}"
        )
    if not np.allclose(affine, ref_affine, atol=AFFINE_TOLERANCE_MM):
        raise InvalidCaseError(f"{path}: affine disagrees with {ref_path.name} (not the same voxel grid)")


# ---------------------------------------------------------------------------------------------
# BraTS-style folders
# ---------------------------------------------------------------------------------------------


def _strip_nifti(name: str) -> str | None:
    for ending in _NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return None


def _brats_files(folder: Path, layout: _Layout) -> tuple[dict[str, Path], Path | None] | None:
    """Modality -> file and label file of ``folder`` under ``layout``, or None if it does not apply."""
    found: dict[str, Path] = {}
    label: Path | None = None
    for entry in sorted(folder.iterdir()):
        stem = _strip_nifti(entry.name)
        if stem is None or entry.name.startswith("."):
            continue
        tag = stem.rsplit(layout.separator, 1)[-1].lower()
        if tag in layout.modalities:
            modality = layout.modalities[tag]
            if modality in found:
                raise InvalidCaseError(
                    f"{folder}: two files for modality {modality}: {found[modality].name} and {entry.name}"
                )
            found[modality] = entry
        elif tag == layout.label_tag:
            label = entry
    if not found:
        return None
    return found, label


def _brats2013_files(folder: Path) -> tuple[dict[str, Path], Path | None] | None:
    found = {m: folder / name for m, name in BRATS2013_FILES.items() if (folder / name).is_file()}
    if not found:
        return None
    label = folder / BRATS2013_LABEL
    return found, label if label.is_file() else None


@dataclass(frozen=True)
class _FolderCase:
    layout: str
    images: dict[str, Path]
    label: Path | None
    label_map: dict[int, int]
    mask: Path | None = None


def _detect_folder(folder: Path) -> _FolderCase | None:
    """What kind of BraTS case folder ``folder`` is, or None when it is none."""
    if not folder.is_dir():
        return None
    files = _brats2013_files(folder)
    if files is not None:
        mask = folder / BRATS2013_MASK
        return _FolderCase(
            "brats2013", files[0], files[1], BRATS2013_LABEL_MAP, mask if mask.is_file() else None
        )
    for layout in (BRATS2021, BRATS2023):
        files = _brats_files(folder, layout)
        if files is not None:
            return _FolderCase(layout.name, files[0], files[1], layout.label_map)
    return None


def _load_folder_case(folder: Path, info: _FolderCase) -> Case:
    images: dict[str, npt.NDArray[np.float32]] = {}
    ref: tuple[Path, tuple[int, ...], npt.NDArray[np.float64]] | None = None
    for modality in MODALITIES:
        path = info.images.get(modality)
        if path is None:
            continue
        data, affine = _read_image(path)
        if ref is None:
            ref = (path, data.shape, affine)
        else:
            _check_grid(path, data.shape, affine, ref)
        images[modality] = data
    assert ref is not None
    label: npt.NDArray[np.uint8] | None = None
    if info.label is not None:
        label, label_affine = _read_label(info.label, info.label_map)
        _check_grid(info.label, label.shape, label_affine, ref)
    case = Case(case_id=folder.name, images=images, affine=ref[2], label=label, source=folder)
    case.extra["layout"] = info.layout
    if info.layout == "brats2013":
        _apply_brain_mask(case, info.mask, ref)
    return case


def _apply_brain_mask(
    case: Case, mask_path: Path | None, ref: tuple[Path, tuple[int, ...], npt.NDArray[np.float64]]
) -> None:
    """BraTS 2013 images are z-scored in the brain: set the outside to exactly 0."""
    case.extra["normalized"] = "zscore"
    if mask_path is None:
        raise InvalidCaseError(f"{case.source}: BraTS 2013 case without {BRATS2013_MASK}")
    mask_data, mask_affine = _canonical_data(mask_path, _load_nifti(mask_path))
    _check_grid(mask_path, mask_data.shape, mask_affine, ref)
    outside = mask_data <= 0.5
    for image in case.images.values():
        image[outside] = 0.0


#: :func:`scanner_intensities`: the brain's lowest z-score maps to this value, one z-score unit to
#: ``SCANNER_UNITS_PER_SD`` whole numbers (a FLAIR brain then spans about 1-1500, as scanners' do).
SCANNER_FLOOR = 1.0
SCANNER_UNITS_PER_SD = 100.0


def scanner_intensities(case: Case) -> Case:
    """``case`` with images a scanner could have written: a case stored z-scored inside the brain
    (``case.extra["normalized"] == "zscore"``, the BraTS 2013 ones) is mapped, per image, to whole
    numbers from :data:`SCANNER_FLOOR` upward inside the brain (its non-zero voxels) and 0 outside, as
    a skull-stripped scanner image; any other case is returned as it is.

    The map is increasing and affine inside the brain, so a model that z-scores the brain (every
    model here) sees the same input, up to rounding; without it, such a case written as DICOM has a
    brain of mostly negative values, in which brain extraction finds no brain.
    """
    if case.extra.get("normalized") != "zscore":
        return case
    images = {}
    for modality, image in case.images.items():
        brain = image != 0
        out = np.zeros_like(image, dtype=np.float32)
        if brain.any():
            values = image[brain].astype(np.float64)
            out[brain] = np.rint((values - values.min()) * SCANNER_UNITS_PER_SD + SCANNER_FLOOR)
        images[modality] = out
    return replace(case, images=images, extra={k: v for k, v in case.extra.items() if k != "normalized"})


def load_case(path: Path) -> Case:
    """Read one BraTS-style case folder (2013, 2019-2021 or 2023 naming).

    Parameters
    ----------
    path:
        The case folder.

    Returns
    -------
    Case
        Images present in the folder (all four modalities, or FLAIR and T1GD for BraTS 2013) in
        canonical RAS+ as float32, and the label map in the Decathlon convention, or ``None`` when
        the folder has no segmentation file.

    Raises
    ------
    InvalidCaseError
        The folder is in no known layout, a file is not readable NIfTI, grids disagree, or the label
        map holds values outside the layout's label set.
    """
    path = Path(path)
    if not path.is_dir():
        raise InvalidCaseError(f"{path}: not a case folder (not a directory)")
    info = _detect_folder(path)
    if info is None:
        raise InvalidCaseError(
            f"{path}: no BraTS images found (expected <id>_flair.nii.gz ..., <id>-t2f.nii.gz ... "
            f"or {BRATS2013_FILES['FLAIR']})"
        )
    case = _load_folder_case(path, info)
    logger.debug("loaded case %s (%s, %s)", case.case_id, info.layout, ",".join(case.images))
    return case


# ---------------------------------------------------------------------------------------------
# Decathlon Task01
# ---------------------------------------------------------------------------------------------


def _channel_names(dataset_json: dict[str, object] | None, n_channels: int, path: Path) -> list[str]:
    """Canonical modality name of each channel, from dataset.json "modality" when present."""
    if n_channels != len(MODALITIES):
        raise InvalidCaseError(f"{path}: expected {len(MODALITIES)} channels, got {n_channels}")
    modality = (dataset_json or {}).get("modality")
    if not isinstance(modality, dict):
        return list(MODALITIES)
    names: list[str] = []
    for index in range(n_channels):
        raw = str(modality.get(str(index), "")).lower()
        if raw not in _DECATHLON_CHANNEL_NAMES:
            raise InvalidCaseError(
                f"{path}: dataset.json modality {index} = {raw!r} is not FLAIR/T1w/T1gd/T2w"
            )
        names.append(_DECATHLON_CHANNEL_NAMES[raw])
    return names


def load_decathlon_case(
    image_path: Path, label_path: Path | None, *, channel_names: Sequence[str] = MODALITIES
) -> Case:
    """Read one Decathlon Task01 case: a 4D image (channels FLAIR, T1w, T1gd, T2w) and its labels.

    Parameters
    ----------
    image_path:
        ``imagesTr/<name>.nii.gz``, shape (X, Y, Z, 4).
    label_path:
        ``labelsTr/<name>.nii.gz`` (labels 0-3), or ``None``.
    channel_names:
        Canonical modality name of each channel, in channel order.

    Returns
    -------
    Case
        With ``case_id`` the file stem (``BRATS_001``).

    Raises
    ------
    InvalidCaseError
        Unreadable file, wrong dimensionality, shapes or affines that disagree, unknown labels.
    """
    image_path = Path(image_path)
    img = _load_nifti(image_path)
    if len(img.shape) != 4:
        raise InvalidCaseError(
            f"{image_path}: expected a 4D image (X, Y, Z, channel), got shape {tuple(img.shape)}"
        )
    if img.shape[3] != len(channel_names):
        raise InvalidCaseError(f"{image_path}: expected {len(channel_names)} channels, got {img.shape[3]}")
    data, affine = _canonical_data(image_path, img)
    if not np.all(np.isfinite(data)):
        raise InvalidCaseError(f"{image_path}: image holds NaN or infinite values")
    images = {
        name: np.ascontiguousarray(data[..., c], dtype=np.float32) for c, name in enumerate(channel_names)
    }
    label: npt.NDArray[np.uint8] | None = None
    if label_path is not None:
        label_path = Path(label_path)
        label, label_affine = _read_label(label_path, DECATHLON_LABEL_MAP)
        _check_grid(label_path, label.shape, label_affine, (image_path, data.shape, affine))
    stem = _strip_nifti(image_path.name) or image_path.stem
    case = Case(case_id=stem, images=images, affine=affine, label=label, source=image_path)
    case.extra["layout"] = "decathlon"
    return case


# ---------------------------------------------------------------------------------------------
# Listing a data folder
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseRef:
    """A case found by :func:`list_cases`, not yet read.

    Attributes
    ----------
    case_id:
        Case identifier (folder name or Decathlon file stem).
    kind:
        ``"folder"`` (BraTS-style case folder) or ``"decathlon"`` (4D image + label file).
    path:
        The case folder, or the Decathlon 4D image.
    label_path:
        The label file, or ``None`` when the case has none.
    layout:
        ``brats2013``, ``brats2021``, ``brats2023`` or ``decathlon``.
    channel_names:
        For Decathlon images: canonical modality of each channel; for case folders: the modalities
        the folder holds, in :data:`MODALITIES` order (known from the file names, before reading).
    """

    case_id: str
    kind: str
    path: Path
    label_path: Path | None
    layout: str
    channel_names: tuple[str, ...] = MODALITIES

    @property
    def has_label(self) -> bool:
        """Whether the case has a label map."""
        return self.label_path is not None

    def load(self) -> Case:
        """Read the case from disk."""
        if self.kind == "decathlon":
            return load_decathlon_case(self.path, self.label_path, channel_names=self.channel_names)
        return load_case(self.path)


def _decathlon_refs(folder: Path) -> list[CaseRef]:
    json_path = folder / "dataset.json"
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidCaseError(f"{json_path}: not readable JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise InvalidCaseError(f"{json_path}: top level is {type(meta).__name__}, expected an object")
    entries = meta.get("training")
    pairs: list[tuple[Path, Path | None]] = []
    if isinstance(entries, list) and entries:
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or "image" not in entry:
                raise InvalidCaseError(f"{json_path}: training[{n}] = {entry!r} has no 'image'")
            label = entry.get("label")
            pairs.append((folder / str(entry["image"]), folder / str(label) if label else None))
    else:
        images_dir = folder / "imagesTr"
        if not images_dir.is_dir():
            raise InvalidCaseError(f"{folder}: dataset.json has no 'training' list and there is no imagesTr/")
        for image in sorted(images_dir.iterdir()):
            if image.name.startswith(".") or _strip_nifti(image.name) is None:
                continue  # the Decathlon archive ships macOS '._*' resource forks
            label = folder / "labelsTr" / image.name
            pairs.append((image, label if label.is_file() else None))
    first_channels: list[str] | None = None
    refs: list[CaseRef] = []
    for image, label in pairs:
        img = _load_nifti(image)
        if len(img.shape) != 4:
            raise InvalidCaseError(
                f"{image}: expected a 4D image (X, Y, Z, channel), got shape {tuple(img.shape)}"
            )
        if first_channels is None:
            first_channels = _channel_names(meta, int(img.shape[3]), image)
        if label is not None:
            label_img = _load_nifti(label)
            if tuple(label_img.shape[:3]) != tuple(img.shape[:3]):
                raise InvalidCaseError(
                    f"{label}: shape {tuple(label_img.shape)} disagrees with "
                    f"{image.name} shape {tuple(img.shape[:3])}"
                )
        stem = _strip_nifti(image.name) or image.stem
        refs.append(CaseRef(stem, "decathlon", image, label, "decathlon", tuple(first_channels)))
    return refs


def _folder_ref(folder: Path, info: _FolderCase) -> CaseRef:
    """A CaseRef for a BraTS case folder, checking grid shapes from headers only."""
    paths = [*info.images.values(), *([info.label] if info.label is not None else [])]
    ref_shape: tuple[int, ...] | None = None
    ref_path = paths[0]
    for path in paths:
        shape = tuple(_load_nifti(path).shape)
        if ref_shape is None:
            ref_shape = shape
        elif shape[:3] != ref_shape[:3]:
            raise InvalidCaseError(
                f"{path}: shape {shape[:3]} disagrees with {ref_path.name} shape {ref_shape[:3]}"
            )
    held = tuple(m for m in MODALITIES if m in info.images)
    return CaseRef(folder.name, "folder", folder, info.label, info.layout, held)


def _collect(folder: Path, depth: int) -> list[CaseRef]:
    if (folder / "dataset.json").is_file():
        return _decathlon_refs(folder)
    info = _detect_folder(folder)
    if info is not None:
        return [_folder_ref(folder, info)]
    if depth == 0:
        return []
    refs: list[CaseRef] = []
    for child in sorted(folder.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            refs.extend(_collect(child, depth - 1))
    return refs


#: A path component of this name (any case) marks final-evaluation data: see :func:`holdout_folder`.
HOLDOUT_NAME = "holdout"


def holdout_folder(path: Path) -> Path | None:
    """The ``holdout`` folder ``path`` lies in, as written (made absolute, ``..`` folded) or once its
    symlinks are resolved; ``None`` when it lies in none."""
    for candidate in (Path(os.path.normpath(path.absolute())), path.resolve()):
        for i, part in enumerate(candidate.parts):
            if part.lower() == HOLDOUT_NAME:
                return Path(*candidate.parts[: i + 1])
    return None


def _holdout_of(ref: CaseRef) -> Path | None:
    """The holdout folder any file of ``ref`` lies in (a case folder's files may be symlinks each)."""
    paths = [ref.path, *([ref.label_path] if ref.label_path is not None else [])]
    if ref.path.is_dir():
        paths += sorted(ref.path.iterdir())
    for path in paths:
        found = holdout_folder(path)
        if found is not None:
            return found
    return None


def list_cases(
    folder: Path, *, require_labels: bool = False, max_depth: int = 3, allow_holdout: bool = False
) -> list[CaseRef]:
    """Find the cases under a data folder.

    Accepts a Decathlon Task01 folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``), a BraTS case
    folder, a folder of BraTS case folders, or a folder of such folders (e.g. ``train/`` holding
    ``brats/`` and ``brats2013_flair_t1c/``), up to ``max_depth`` levels deep.

    Parameters
    ----------
    folder:
        Where to look.
    require_labels:
        Refuse a case that has no label file.
    max_depth:
        How many folder levels below ``folder`` to search.
    allow_holdout:
        Accept cases under a folder named ``holdout`` (:func:`holdout_folder`: the path as given or its
        symlinks resolved). Only final evaluation may (``segnode evaluate``, benchmarks/holdout_node.py):
        training, validation, calibration and anything else that chooses a checkpoint or a threshold
        must never see the holdout.

    Returns
    -------
    list[CaseRef]
        Sorted by discovery order (folders sorted by name); call ``.load()`` to read one.

    Raises
    ------
    InvalidCaseError
        ``folder`` is missing or holds no case, a case lacks labels under ``require_labels``, two
        cases share an id, a header is unreadable, or image and label shapes disagree.
    HoldoutDataError
        A case lies under a ``holdout`` folder and ``allow_holdout`` is false.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidCaseError(f"{folder}: data folder not found")
    refs = _collect(folder, max_depth)
    if not refs:
        raise InvalidCaseError(
            f"{folder}: neither a Decathlon Task01 folder (dataset.json, imagesTr/, labelsTr/) "
            "nor a folder of BraTS case folders (<id>_flair.nii.gz ..., <id>-t2f.nii.gz ...)"
        )
    seen: dict[str, Path] = {}
    for ref in refs:
        held_out = None if allow_holdout else _holdout_of(ref)
        if held_out is not None:
            raise HoldoutDataError(
                f"{ref.path}: case {ref.case_id!r} is holdout data (under {held_out}): the holdout is for "
                "final evaluation only (segnode evaluate), never for training, validation or calibration"
            )
        if ref.case_id in seen:
            raise InvalidCaseError(f"{ref.path}: case id {ref.case_id!r} also used by {seen[ref.case_id]}")
        seen[ref.case_id] = ref.path
        if require_labels and ref.label_path is None:
            raise InvalidCaseError(
                f"{ref.path}: case {ref.case_id!r} has no label file and labels are required"
            )
    logger.info("found %d cases under %s", len(refs), folder)
    return refs


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _save(array: npt.NDArray[np.generic], affine: npt.NDArray[np.float64], path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, str(path))


def write_decathlon_case(case: Case, out_dir: Path, name: str | None = None) -> tuple[Path, Path | None]:
    """Write ``case`` as ``imagesTr/<name>.nii.gz`` (4D float32) and ``labelsTr/<name>.nii.gz`` (uint8).

    Parameters
    ----------
    case:
        Must hold all four modalities.
    out_dir:
        The Task01 folder; ``imagesTr`` and ``labelsTr`` are created in it.
    name:
        File stem; defaults to ``case.case_id``.

    Returns
    -------
    tuple[Path, Path | None]
        Image path and label path (``None`` when the case has no label).
    """
    missing = [m for m in MODALITIES if m not in case.images]
    if missing:
        raise InvalidCaseError(
            f"case {case.case_id}: modalities {missing} missing, Task01 needs {list(MODALITIES)}"
        )
    name = name or case.case_id
    out_dir = Path(out_dir)
    (out_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    image_path = out_dir / "imagesTr" / f"{name}.nii.gz"
    stacked = np.stack([case.images[m].astype(np.float32) for m in MODALITIES], axis=-1)
    _save(stacked, case.affine, image_path)
    label_path: Path | None = None
    if case.label is not None:
        (out_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
        label_path = out_dir / "labelsTr" / f"{name}.nii.gz"
        _save(case.label.astype(np.uint8), case.affine, label_path)
    return image_path, label_path


def write_dataset_json(
    out_dir: Path, names: Sequence[str], *, name: str = "BRATS", description: str = ""
) -> Path:
    """Write a Decathlon Task01 ``dataset.json`` listing ``names`` as training cases."""
    meta = {
        "name": name,
        "description": description or "Gliomas segmentation tumour and oedema in on brain images",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {str(k): v for k, v in DECATHLON_LABELS.items()},
        "numTraining": len(names),
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names],
        "test": [],
    }
    path = Path(out_dir) / "dataset.json"
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path
