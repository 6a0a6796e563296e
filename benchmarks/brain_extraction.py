"""Brain extraction per study on 2 cores: time, peak memory, and the brain network's grid.

Each row runs in a fresh process pinned to 2 cores (``sched_setaffinity``, OpenVINO
``INFERENCE_NUM_THREADS`` 2): load the extractor (compile both IR), one warm-up, then the median of
``--repeat`` extractions of the study. Studies: the real series with skull in ``dicom/`` (GE 3D axial
1.2 mm, Philips 3D sagittal 1 mm, Siemens 2D sagittal 4 mm), a BraTS training FLAIR at 1 mm and the
same FLAIR written as 5 mm slices (31 slices: the "2D FLAIR of about 30 slices"). For each study the
shipped grid (256³) and smaller brain-network grids (224³, 192³, 160³) are timed, and their mask is
compared with the shipped grid's (Dice).

Targets (issue 15): <= 1.5 s for a 2D FLAIR of about 30 slices, <= 3 s for a 1 mm 3D volume, peak RSS
<= 1.5 GiB.

Usage: python benchmarks/brain_extraction.py [--grids 256,224,192] [--repeat 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED_DATA, machine, markdown_table, peak_rss_mib, run_child, save_result

EXTRACTOR = REPO / "models" / "brain_extraction"
BRATS_CASE = "BraTS2021_00006"


def grid_dice(mask: np.ndarray, reference: np.ndarray) -> float | None:
    """Dice of a grid's brain mask with the first grid's, to 4 places; None ("n/a") when both are empty
    (no brain found on either grid: nothing to compare, not a Dice of 0)."""
    total = int(np.count_nonzero(mask)) + int(np.count_nonzero(reference))
    if total == 0:
        return None
    return round(2 * int(np.count_nonzero(mask & reference)) / total, 4)


def studies() -> list[str]:
    """The study names this benchmark runs (those present in the shared data)."""
    names = sorted(p.name for p in (SHARED_DATA / "dicom").glob("*") if p.is_dir())
    if (SHARED_DATA / "train" / "brats" / BRATS_CASE).is_dir():
        names += [f"{BRATS_CASE}_flair_1mm", f"{BRATS_CASE}_flair_5mm"]
    return names


def load_study(name: str) -> tuple[np.ndarray, np.ndarray]:
    """RAS voxels and affine of study ``name``."""
    if name.startswith(BRATS_CASE):
        import nibabel as nib

        path = next((SHARED_DATA / "train" / "brats" / BRATS_CASE).glob("*_flair.nii.gz"))
        img = nib.as_closest_canonical(nib.load(path))
        image, affine = img.get_fdata(dtype=np.float32), img.affine.copy()
        if name.endswith("5mm"):
            n = image.shape[2] // 5
            image = image[:, :, : n * 5].reshape(*image.shape[:2], n, 5).mean(axis=-1)
            affine[:3, 2] *= 5
        return image, affine
    from converters.dicom_series import load_series_folder
    from converters.reorient import volume_to_ras

    return volume_to_ras(load_series_folder(SHARED_DATA / "dicom" / name))


def child(name: str, grid: int, repeat: int, mask_out: Path | None) -> dict[str, Any]:
    """One study at one grid, in this (fresh, 2-core) process."""
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:2]))
    from db.card import load_card
    from node.brain_extraction import BrainExtractor, NoBrainFoundError, brain_volume_ml

    image, affine = load_study(name)
    card = load_card(EXTRACTOR)
    card["preprocessing"]["brain_grid"] = [grid] * 3
    start = time.perf_counter()
    extractor = BrainExtractor(card, EXTRACTOR, threads=2)
    load_s = time.perf_counter() - start

    def run() -> tuple[np.ndarray, str]:
        try:
            return extractor.extract(image, affine), ""
        except NoBrainFoundError as exc:  # timed as well: refusing is the answer for a non-head
            return np.zeros(image.shape, dtype=bool), str(exc)

    run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        mask, refused = run()
        times.append(time.perf_counter() - start)
    if mask_out is not None:
        np.save(mask_out, mask)
    return {
        "study": name,
        "shape": list(image.shape),
        "grid": grid,
        "load_s": round(load_s, 2),
        "extract_s": round(statistics.median(times), 3),
        "brain_ml": round(brain_volume_ml(mask, affine), 1),
        "no_brain": refused,
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", default="256,224,192,160")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=3, metavar=("STUDY", "GRID", "MASK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, grid, mask = args.child
        print(json.dumps(child(name, int(grid), args.repeat, Path(mask) if mask != "-" else None)))
        return
    grids = [int(g) for g in args.grids.split(",")]
    tmp = REPO / "build" / "bench" / "brain_masks"
    tmp.mkdir(parents=True, exist_ok=True)
    rows, results = [], []
    for name in studies():
        reference = None
        for grid in grids:
            mask_file = tmp / f"{name}_{grid}.npy"
            result = run_child(
                [str(Path(__file__).resolve()), "--repeat", str(args.repeat), "--child", name, str(grid),
                 str(mask_file)]
            )
            mask = np.load(mask_file)
            if reference is None:
                reference = mask
            result["dice_vs_first_grid"] = grid_dice(mask, reference)
            results.append(result)
            rows.append([
                name, "x".join(map(str, result["shape"])), f"{grid}³", f"{result['extract_s']:.2f}",
                f"{result['load_s']:.1f}", "no brain" if result["no_brain"] else f"{result['brain_ml']:.0f}",
                "n/a" if result["dice_vs_first_grid"] is None else f"{result['dice_vs_first_grid']:.4f}",
                f"{result['peak_rss_mib']:.0f}",
            ])
            print(" | ".join(rows[-1]), flush=True)
    headers = ["study", "voxels", "brain grid", "extract s (2 cores)", "load s", "brain mL",
               f"Dice vs {grids[0]}³", "peak RSS MiB"]
    table = markdown_table(headers, rows)
    print()
    print(table)
    markdown = (
        f"Each row: a fresh process on 2 cores, the median of {args.repeat} extractions after a warm-up. "
        "Targets: <= 1.5 s for a 2D FLAIR of about 30 slices, <= 3 s for a 1 mm 3D volume, peak RSS "
        "<= 1.5 GiB. The node runs the first grid (the card's).\n\n" + table
    )
    result = {"machine": machine(), "results": results, "markdown": markdown}
    path = save_result("brain_extraction", result, args.out)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
