"""docs/images/image-path.png: what the node does to an image, drawn from real series.

Row 1, a real scanner series with skull (the Philips 3D sagittal T1 of a healthy volunteer in
../shared/data/dicom): the series as it arrived (its middle slice), the brain mask of the node's
brain extraction over it, and the model's input (the window of the model's 1 mm RAS grid, z-scored
inside the brain, zero outside).

Row 2, a tumour: the shipped demo case's FLAIR re-acquired as a 20° oblique series (as a scanner
might write it), the model's input for it, and the node's segmentation put back on the series' own
frames, over the source slice with the most tumour (what the SEG shows in a viewer).

Usage: python docs/figure_image_path.py [--out docs/images/image-path.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters.dicom_series import load_series  # noqa: E402
from converters.nifti import load_case  # noqa: E402
from converters.reorient import ras_to_volume, volume_to_ras  # noqa: E402
from converters.reslice import SeriesPlan, reslice_case  # noqa: E402
from node.brain_extraction import BrainExtractor  # noqa: E402
from node.demo import DEFAULT_CASE  # noqa: E402
from node.segmenter import OpenVINOSegmenter  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SERIES = SHARED / "dicom" / "philips_t1_sag3d_mprage_healthy"


def _grey(image: np.ndarray) -> np.ndarray:
    """A slice scaled to [0, 1] by its 1st and 99.5th percentiles."""
    low, high = np.percentile(image, [1, 99.5])
    return np.clip((image - low) / max(high - low, 1e-6), 0, 1)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "image-path.png")
    args = parser.parse_args()

    extractor = BrainExtractor.from_dir(ROOT / "models" / "brain_extraction")
    card = json.loads((ROOT / "models" / "default" / "model.json").read_text(encoding="utf-8"))
    segmenter = OpenVINOSegmenter(card, ROOT / "models" / "default" / "model_int8.xml")

    # Row 1: a head with skull.
    volume = load_series(sorted(p for p in SERIES.iterdir() if p.is_file()))
    image, affine = volume_to_ras(volume)
    mask = extractor.extract(image, affine)
    prepared = segmenter.prepare({"FLAIR": image}, affine, mask)
    mid = volume.array.shape[0] // 2
    source = volume.array[mid]
    mask_source = np.asarray(ras_to_volume(mask.astype(np.uint8), volume))[mid] > 0
    model_input = prepared.slices[len(prepared.slices) // 2, 0]
    brain_ml = float(mask.sum()) * float(np.prod(volume.spacing)) / 1000.0

    # Row 2: a tumour, re-acquired oblique.
    case = load_case(DEFAULT_CASE)
    resliced = reslice_case(case, SeriesPlan("oblique", tilt_degrees=20.0), ["FLAIR"])
    oblique = resliced.volumes["FLAIR"]
    o_image, o_affine = volume_to_ras(oblique)
    o_mask = extractor.extract(o_image, o_affine)
    o_prepared = segmenter.prepare({"FLAIR": o_image}, o_affine, o_mask)
    labels = np.asarray(ras_to_volume(segmenter.infer(o_prepared), oblique)) > 0
    labels &= np.asarray(ras_to_volume(o_mask.astype(np.uint8), oblique)) > 0
    best = int(labels.reshape(len(labels), -1).sum(axis=1).argmax())
    tumour_plane = int(o_prepared.slices.shape[0] // 2)

    fig, axes = plt.subplots(2, 3, figsize=(12, 8.4))
    panels = [
        (_grey(source), None, f"1. as received: Philips 3D sagittal T1\n(with skull), slice {mid + 1}"),
        (_grey(source), mask_source, f"2. brain mask (deepbet via OpenVINO)\n{brain_ml:.0f} mL"),
        (model_input, None, "3. model input: 1 mm RAS grid,\nz-scored inside the brain, 0 outside"),
        (_grey(oblique.array[best]), None, "4. a tumour study,\nre-acquired 20° oblique"),
        (o_prepared.slices[tumour_plane, 0], None, "5. its model input\n(resampled in world space)"),
        (_grey(oblique.array[best]), labels[best], "6. SEG on the source frame\n(as a viewer shows it)"),
    ]
    for ax, (picture, overlay, title) in zip(axes.ravel(), panels, strict=True):
        ax.imshow(picture, cmap="gray", interpolation="nearest")
        if overlay is not None and overlay.any():
            ax.contour(overlay, levels=[0.5], colors=["#ff3030"], linewidths=1.2)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle("What segnode does to an image", fontsize=13)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out} (brain {brain_ml:.0f} mL; tumour on source slice {best + 1})")


if __name__ == "__main__":
    main()
