"""The node's brain extractor: deepbet's two TorchScript networks as OpenVINO IR, checked, with a card.

``segnode export-brain-extractor OUT_DIR`` runs :func:`export_brain_extractor`:

1. the two networks of the installed ``deepbet`` package (PyPI ``deepbet==1.0.2``, MIT;
   ``data/models/bbox_model.pt`` and ``model.pt``), their sha256 checked against the package's
   RECORD;
2. each exported to ONNX (opset 17, dynamic spatial axes: the networks are fully convolutional) and
   converted to OpenVINO IR FP32 (no FP16 compression, no INT8: not measured equal, so not shipped);
3. the IR, run by the node's own :class:`node.brain_extraction.BrainExtractor` code path, checked
   against the original TorchScript networks run by deepbet's own ``BrainExtraction`` on real images
   (the healthy series with skull in ``dicom/`` and the BraTS training FLAIRs and T1s): the largest
   difference of the brain network's probabilities and the Dice of the two masks, per image;
4. ``model.json`` (task ``brain_extraction``; docs/model-card.md), the IR files with sha256, and a
   ``NOTICE`` (source, wheel and network sha256, MIT licence, the paper).

The ONNX files are intermediate and not kept (the IR is what the node runs; the TorchScript
originals are on PyPI under the sha256 the NOTICE gives).

The export runs on the trainer side (torch, deepbet); the node never imports this module.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from converters.brain_mask import BrainExtractionSettings, BrainMasker, Network
from converters.staged_network import compile_network, foreground_only, on_grid
from db.card import CARD_NAME, FORMAT_VERSION, file_entry, sha256_file
from trainer.exceptions import TrainerError

logger = logging.getLogger(__name__)

NAME = "deepbet"
VERSION = "1.0.2"
#: sha256 of ``deepbet-1.0.2-py3-none-any.whl`` as PyPI serves it (checked when pip downloaded it).
WHEEL_SHA256 = "1999e2ea00ec48f6233b95b96f3901a962d3f70431c63aeb985e8a49a198473c"
WHEEL_URL = "https://pypi.org/project/deepbet/1.0.2/"
CITATION = (
    "Fisch L, Zumdick S, Barkhau C, Emden D, Ernsting J, Leenings R, Sarink K, Winter NR, Risse B, "
    "Dannlowski U, Hahn T. deepbet: Fast brain extraction of T1-weighted MRI using Convolutional Neural "
    "Networks. Computers in Biology and Medicine 179 (2024) 108845. doi:10.1016/j.compbiomed.2024.108845"
)
#: The card's networks: key -> (deepbet's file, the IR's file stem).
NETWORKS: dict[str, tuple[str, str]] = {
    "bbox": ("bbox_model.pt", "bbox_fp32"),
    "brain": ("model.pt", "brain_fp32"),
}

#: The card's ``preprocessing`` block (node/brain_extraction.py reads it). The brain network's grid is
#: deepbet's 256³: smaller grids were measured less faithful (benchmarks/brain_extraction.py).
PREPROCESSING: dict[str, Any] = {
    "orientation": "RAS",
    "bbox_grid": [128, 128, 128],
    "brain_grid": [256, 256, 256],
    "interpolation": "nearest",
    "bbox_margin": 0.1,
    "bbox_plane_fraction": 0.02,
    "normalization": {"percentiles": [0.5, 99.5], "scale_mean": 0.449, "scale_std": 0.226},
    "min_brain_ml": 100.0,
    "min_structure": 0.5,
    "min_contrast": 0.15,
    "stripped_margin_mm": 5.0,
    "stripped_outside_fraction": 0.01,
}


def deepbet_files() -> dict[str, Path]:
    """The installed deepbet's TorchScript networks by card key, their sha256 checked against RECORD.

    Raises
    ------
    TrainerError
        deepbet is not installed (``pip install deepbet==1.0.2``, in the ``train`` extra), is another
        version, or a network differs from what its RECORD says.
    """
    try:
        dist = importlib.metadata.distribution("deepbet")
    except importlib.metadata.PackageNotFoundError:
        raise TrainerError(
            "deepbet is not installed: pip install 'segnode[train]' (deepbet==1.0.2)"
        ) from None
    if dist.version != VERSION:
        raise TrainerError(f"deepbet {dist.version} is installed; this export is for deepbet {VERSION}")
    out: dict[str, Path] = {}
    for key, (name, _) in NETWORKS.items():
        entry = next((f for f in dist.files or [] if str(f) == f"data/models/{name}"), None)
        if entry is None or entry.hash is None:
            raise TrainerError(f"deepbet's RECORD lists no data/models/{name}")
        path = Path(str(entry.locate()))
        digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
        if digest != entry.hash.value:
            raise TrainerError(f"{path}: sha256 differs from deepbet's RECORD; reinstall deepbet")
        out[key] = path
    return out


def export_ir(torchscript: Path, xml: Path, grid: int) -> None:
    """TorchScript -> ONNX (opset 17, dynamic spatial axes) -> OpenVINO IR FP32 at ``xml``."""
    import openvino as ov
    import torch

    model = torch.jit.load(str(torchscript), map_location="cpu").eval()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        axes = {2: "x", 3: "y", 4: "z"}
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, grid, grid, grid),),
            str(onnx_path),
            input_names=["image"],
            output_names=["probabilities"],
            dynamic_axes={"image": axes, "probabilities": axes},
            opset_version=17,
            dynamo=False,
        )
        ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)


@dataclass(frozen=True)
class CheckImage:
    """A real image to check the IR on: its name, RAS voxels, affine, and optional tumour labels."""

    name: str
    image: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    tumour: npt.NDArray[np.bool_] | None = None


def check_folders(data_dir: Path, *, brats_limit: int = 0) -> tuple[list[Path], list[Path]]:
    """The ``dicom/*`` series folders and ``train/brats/*`` case folders :func:`check_images` reads."""
    series = sorted(p for p in (data_dir / "dicom").glob("*") if p.is_dir())
    cases = sorted(p for p in (data_dir / "train" / "brats").glob("*") if p.is_dir())
    return series, cases[: brats_limit or None]


def check_images(data_dir: Path, *, brats_limit: int = 0) -> Iterator[CheckImage]:
    """The real images of ``data_dir`` (the shared data folder): ``dicom/*`` series with skull, then the
    FLAIR and T1 of each ``train/brats`` case (``brats_limit`` > 0: the first ones only). Never holdout."""
    import nibabel as nib

    from converters.dicom_series import load_series_folder
    from converters.reorient import volume_to_ras

    series, cases = check_folders(data_dir, brats_limit=brats_limit)
    for folder in series:
        image, affine = volume_to_ras(load_series_folder(folder))
        yield CheckImage(folder.name, image, affine)
    for case in cases:
        seg = nib.as_closest_canonical(nib.load(next(case.glob("*_seg.nii.gz"))))
        tumour = np.asarray(seg.dataobj) > 0
        for modality in ("flair", "t1"):
            img = nib.as_closest_canonical(nib.load(next(case.glob(f"*_{modality}.nii.gz"))))
            yield CheckImage(f"{case.name}_{modality}", img.get_fdata(dtype=np.float32), img.affine, tumour)


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    """Dice of two masks (1.0 when both are empty)."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def ir_masker(card: Mapping[str, Any], directory: Path) -> BrainMasker:
    """The card's IR networks compiled by OpenVINO (CPU, FP32, static shapes) as the node runs them
    (the brain network staged: converters/staged_network.py), in the shared algorithm."""
    import openvino as ov

    settings = BrainExtractionSettings.from_card(card)
    core = ov.Core()
    grids = {"bbox": settings.bbox_grid, "brain": settings.brain_grid}
    channel = int(card["output"].get("channel", 1))

    def network(key: str) -> Network:
        model = core.read_model(str(directory / card["networks"]["fp32"][key]))
        model.reshape([1, 1, *grids[key]])
        cut = foreground_only(model, channel)
        run, _ = compile_network(core, cut, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return on_grid(run)

    return BrainMasker(settings, network("bbox"), network("brain"))


@dataclass
class Recorded:
    """A network callable that keeps its last input and output, so that the check can run the original
    network on exactly what the IR saw, without running the IR a second time."""

    net: Network
    last: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None = None

    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        seen = x.copy()  # the staged network consumes a network buffer (converters/network_buffers.py)
        y = self.net(x)
        self.last = (seen, y)
        return y


def network_difference(
    reference: Any, seen: Mapping[str, tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]
) -> float:
    """Largest |p_IR - p_TorchScript| of both networks, each original run on the normalised grid its IR
    saw: ``seen`` maps ``bbox`` and ``brain`` to the IR's (input, output) (:class:`Recorded`)."""
    import torch

    worst = 0.0
    for key, net in (("bbox", reference.bbox_model), ("brain", reference.model)):
        x, p_ir = seen[key]
        with torch.no_grad():
            p_ref = net(torch.from_numpy(x)[None, None])[0, 1].numpy()
        worst = max(worst, float(np.abs(p_ir - p_ref).max()))
    return worst


def compare(
    out_dir: Path,
    card: Mapping[str, Any],
    originals: Mapping[str, Path],
    images: Sequence[CheckImage] | Iterator[CheckImage],
    on_step: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Per image: the IR (node code) against the TorchScript networks (deepbet's own code).

    ``network_max_abs_diff`` is the largest difference of the two networks' probabilities on the same
    inputs (both networks, the image's own normalised grids: the conversion, and the IR run as the
    node runs it, the brain network staged);
    ``mean_abs_prob_diff`` is over the brain probabilities on the whole grid, each pipeline its own
    (resizing and box included); ``dice`` is of deepbet's mask (threshold, largest component, holes
    filled) of each; ``tumour_inside`` and
    ``nonzero_inside`` (skull-stripped BraTS images) are of the node's final mask.
    """
    import torch
    from deepbet.bet import BrainExtraction

    from converters.brain_mask import NoBrainFoundError, brain_volume_ml

    torch.set_num_threads(max(1, torch.get_num_threads()))
    reference = BrainExtraction(
        no_gpu=True, model_path=str(originals["brain"]), bbox_model_path=str(originals["bbox"])
    )
    extractor = ir_masker(card, out_dir)
    recorded = {"bbox": Recorded(extractor.bbox_net), "brain": Recorded(extractor.brain_net)}
    extractor.bbox_net, extractor.brain_net = recorded["bbox"], recorded["brain"]
    rows = []
    for item in images:
        if on_step:
            on_step(f"checking the IR against the original on {item.name}")
        p_ref = reference.run_model(item.image.copy())
        m_ref = reference.postprocess(p_ref > card["output"]["threshold"]).astype(bool)
        for r in recorded.values():
            r.last = None
        p_ir, box = extractor.probabilities(item.image)
        seen = {key: r.last for key, r in recorded.items() if r.last is not None}
        p_full = np.zeros(item.image.shape, dtype=np.float32)
        p_full[box] = p_ir
        net_diff = network_difference(reference, seen)
        m_ir = extractor.mask_of(p_ir, box, item.image.shape)
        try:
            final: npt.NDArray[np.bool_] | None = extractor.extract(item.image, item.affine)
            no_brain = ""
        except NoBrainFoundError as exc:
            final, no_brain = None, str(exc)
        row: dict[str, Any] = {
            "case": item.name,
            "shape": list(item.image.shape),
            "network_max_abs_diff": round(net_diff, 6),
            "mean_abs_prob_diff": round(float(np.abs(p_full - p_ref).mean()), 6),
            "dice": round(dice(m_ir, m_ref), 6),
            "brain_volume_ml": round(brain_volume_ml(final, item.affine), 1) if final is not None else None,
            "reference_volume_ml": round(brain_volume_ml(m_ref, item.affine), 1),
        }
        if no_brain:
            row["no_brain"] = no_brain
        if item.tumour is not None and final is not None:
            nonzero = item.image != 0
            row["tumour_inside"] = round(float((final & item.tumour).sum() / max(item.tumour.sum(), 1)), 6)
            row["nonzero_inside"] = round(float((final & nonzero).sum() / max(nonzero.sum(), 1)), 6)
        logger.info("brain extractor check %s: %s", item.name, row)
        rows.append(row)
    return rows


def metrics_block(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The artifact's ``metrics``: ``mean.dice`` is the Dice of the IR's mask with the original's."""
    mean: dict[str, float] = {
        "dice": round(float(np.mean([r["dice"] for r in rows])), 6),
        "network_max_abs_diff": round(float(max(r["network_max_abs_diff"] for r in rows)), 6),
        "mean_abs_prob_diff": round(float(np.mean([r["mean_abs_prob_diff"] for r in rows])), 6),
    }
    for key in ("tumour_inside", "nonzero_inside"):
        values = [r[key] for r in rows if key in r]
        if values:
            mean[f"min_{key}"] = round(float(min(values)), 6)
    return {
        "cases": [r["case"] for r in rows],
        "split": "train (dicom/ healthy series with skull, train/brats FLAIR and T1)",
        "reference": f"original TorchScript networks of deepbet {VERSION}, run by deepbet's own code",
        "mean": mean,
        "per_case": list(rows),
    }


def notice_text(originals: Mapping[str, Path]) -> str:
    """The NOTICE: source, checksums, licence text and citation."""
    import deepbet

    licence = ""
    dist = importlib.metadata.distribution("deepbet")
    for f in dist.files or []:
        if str(f).endswith("LICENSE"):
            licence = Path(str(f.locate())).read_text(encoding="utf-8")
    if not licence:
        raise TrainerError("deepbet's LICENSE file is not installed; cannot write the NOTICE")
    lines = [
        f"{NAME} {VERSION} brain extractor (OpenVINO IR) - NOTICE",
        "",
        "The networks in this directory are the two trained networks of deepbet, converted by",
        "segnode (TorchScript -> ONNX opset 17 -> OpenVINO IR FP32); the weights are unchanged.",
        "",
        f"Source:   PyPI deepbet {VERSION} ({WHEEL_URL}), module {Path(deepbet.__file__).parent.name}",
        f"Wheel:    deepbet-{VERSION}-py3-none-any.whl sha256 {WHEEL_SHA256}",
    ]
    for key, (name, stem) in NETWORKS.items():
        lines.append(
            f"Network:  data/models/{name} sha256 {sha256_file(originals[key])} -> {stem}.xml/.bin ({key})"
        )
    lines += [
        "Licence:  MIT (below)",
        f"Cite:     {CITATION}",
        "",
        "deepbet was trained on T1-weighted images of healthy adults; segnode checks it on FLAIR and",
        "T1 of tumour cases and on healthy series with skull (model.json, metrics).",
        "",
        "---- deepbet LICENSE ----",
        licence.strip(),
        "",
    ]
    return "\n".join(lines)


def export_brain_extractor(
    out_dir: Path,
    data_dir: Path | None = None,
    *,
    brats_limit: int = 0,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the brain extractor's model directory at ``out_dir`` (IR, model.json, NOTICE).

    ``data_dir``: the shared data folder for the check against the original networks (None: no check,
    and the card has no metrics, so the model cannot be promoted without ``--force``).

    Raises
    ------
    TrainerError
        ``data_dir`` holds no image to check on (checked before anything is written), deepbet is
        missing, or an IR mask differs from the original's (Dice < 0.99 on an image).
    """
    if data_dir is not None and not any(check_folders(data_dir, brats_limit=brats_limit)):
        raise TrainerError(
            f"--data {data_dir} holds no image to check the IR on: no series folder under "
            f"{data_dir / 'dicom'} and no case folder under {data_dir / 'train' / 'brats'} "
            "(give the shared data folder itself, not its train/)"
        )
    originals = deepbet_files()
    out_dir.mkdir(parents=True, exist_ok=True)
    for key, (name, stem) in NETWORKS.items():
        if on_step:
            on_step(f"exporting {name} to ONNX and OpenVINO IR")
        grid = PREPROCESSING["bbox_grid" if key == "bbox" else "brain_grid"][0]
        export_ir(originals[key], out_dir / f"{stem}.xml", grid)
    files = [out_dir / f"{stem}.{ext}" for _, stem in NETWORKS.values() for ext in ("xml", "bin")]
    card: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": NAME,
        "version": VERSION,
        "task": "brain_extraction",
        "modalities": ["T1", "FLAIR"],
        "preprocessing": PREPROCESSING,
        "output": {"activation": "softmax", "threshold": 0.5, "channel": 1},
        "labels": [],
        "networks": {"fp32": {key: f"{stem}.xml" for key, (_, stem) in NETWORKS.items()}},
        "source": {
            "package": f"deepbet=={VERSION}",
            "wheel_sha256": WHEEL_SHA256,
            "networks": {
                key: {"file": f"data/models/{name}", "sha256": sha256_file(originals[key])}
                for key, (name, _) in NETWORKS.items()
            },
            "licence": "MIT",
            "citation": CITATION,
        },
        "artifacts": [
            {
                "key": "ir_fp32",
                "kind": "ir",
                "precision": "fp32",
                "parent": None,
                "files": [file_entry(f, out_dir) for f in files],
                "metrics": None,
            }
        ],
    }
    (out_dir / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    if data_dir is not None:
        rows = compare(out_dir, card, originals, check_images(data_dir, brats_limit=brats_limit), on_step)
        bad = [r["case"] for r in rows if r["dice"] < 0.99]
        if bad:
            raise TrainerError(f"the IR's brain mask differs from the original's (Dice < 0.99) on {bad}")
        card["artifacts"][0]["metrics"] = metrics_block(rows)
        (out_dir / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    (out_dir / "NOTICE").write_text(notice_text(originals), encoding="utf-8")
    return card
