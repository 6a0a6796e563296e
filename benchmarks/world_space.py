"""World-space preprocessing: whole-tumour Dice of a model on training cases re-acquired as scanners do.

Each BraTS training case (FLAIR) is re-acquired with :func:`converters.reslice.reslice_case` as an
axial 1 mm series (the reference), sagittal, coronal and 20° oblique series, axial 5 and 6 mm
slices, and an axial 1 mm series with a bias field; the node's own path then runs on each
(``volume_to_ras`` -> ``prepare_volume`` -> OpenVINO -> back onto the series' grid -> the series'
(slice, row, column) order), and the prediction is scored against the ground truth resampled
alongside, on the series' own grid. Both ways of going back are scored: nearest-neighbour labels and
linearly resampled probabilities thresholded at the card's threshold (for grids that are only
cropped, not resampled, they are identical). The DICOM write/read round trip is left out: it is
exact (tests/converters/test_reslice.py).

Training cases only (never the holdout): the figures choose converters.prediction.DEFAULT_RESTORE.

Usage: python benchmarks/world_space.py [--model DIR] [--precision fp32|int8] [--data DIR] [--cases N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters.nifti import list_cases, load_case
from converters.prediction import card_tile, predict_slices, restore_outputs
from converters.reorient import ras_to_volume, volume_to_ras
from converters.reslice import SeriesPlan, reslice_case

ROOT = Path(__file__).resolve().parents[1]
PLANS = {
    "axial 1 mm": SeriesPlan("axial"),
    "sagittal 0.94 mm px, 1.2 mm": SeriesPlan("sagittal", pixel_spacing_mm=0.94, slice_thickness_mm=1.2),
    "coronal 0.8 mm px, 3 mm": SeriesPlan("coronal", pixel_spacing_mm=0.8, slice_thickness_mm=3.0),
    "oblique 20°, 1 mm": SeriesPlan("oblique", tilt_degrees=20.0),
    "axial 5 mm": SeriesPlan("axial", slice_thickness_mm=5.0),
    "axial 0.45 mm px, 6 mm": SeriesPlan("axial", pixel_spacing_mm=0.45, slice_thickness_mm=6.0),
    "axial 1 mm, bias 0.3": SeriesPlan("axial", bias_field=0.3, seed=1),
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks (1.0 when both are empty)."""
    a, b = a > 0, b > 0
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "train" / "brats")
    parser.add_argument("--cases", type=int, default=0, help="first N cases (0: all)")
    args = parser.parse_args()

    from node.segmenter import OpenVINOSegmenter

    card = json.loads((args.model / "model.json").read_text())
    segmenter = OpenVINOSegmenter(card, args.model / f"model_{args.precision}.xml")
    refs = list_cases(args.data, require_labels=True)
    refs = refs[: args.cases] if args.cases else refs
    rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in PLANS}
    for ref in refs:
        case = load_case(ref.path)
        for name, plan in PLANS.items():
            resliced = reslice_case(case, plan, card["modalities"])
            assert resliced.label is not None
            volume = resliced.reference
            start = time.perf_counter()
            arrays = {m: volume_to_ras(v)[0] for m, v in resliced.volumes.items()}
            affine = volume_to_ras(volume)[1]
            prepared = segmenter.prepare(arrays, affine)
            tile = card_tile(card)
            outputs = predict_slices(segmenter.predict, prepared.slices, segmenter.batch_size, tile)
            scores = []
            for method in ("nearest", "linear"):
                labels = ras_to_volume(restore_outputs(prepared, outputs, card, method), volume)
                scores.append(dice(labels, resliced.label))
            rows[name].append((scores[0], scores[1], time.perf_counter() - start))
            print(f"{ref.case_id:24s} {name:30s} nearest {scores[0]:.4f} linear {scores[1]:.4f}", flush=True)
    print(f"\nmodel {card['name']} {card['version']} {args.precision}, {len(refs)} training cases (FLAIR)\n")
    print("| series | Dice nearest | Dice linear | Δ linear vs axial 1 mm | s per case |")
    print("|---|---|---|---|---|")
    reference = float(np.mean([r[1] for r in rows["axial 1 mm"]]))
    for name, values in rows.items():
        near, lin, sec = (float(np.mean([v[i] for v in values])) for i in range(3))
        print(f"| {name} | {near:.4f} | {lin:.4f} | {lin - reference:+.4f} | {sec:.1f} |")


if __name__ == "__main__":
    main()
