"""Which FLAIR of a study should the node segment: a 2D axial one of thick slices or a 3D one of 1 mm?

Each BraTS training case (never the holdout) is re-acquired (:func:`converters.reslice.reslice_case`)
as an axial series of 5 mm and of 3 mm slices, as a 3D sagittal series of 1 mm and as its own axial
1 mm grid, each written as a DICOM study and sent alone to an in-process node serving the model under
test (``--model``, default the shipped one; no brain-extraction model is installed, so the brain
stage is skipped alike for all). The SEG that comes back is read with highdicom on its series' frames
and taken back, nearest voxel, onto the case's own 1 mm grid, where it is scored against the case's
label: the same truth for every acquisition. The Dice on the series' own grid (against the label
resampled alongside, as benchmarks/holdout_node.py scores) is printed beside it: it flatters thick
slices, whose truth is as coarse as the prediction.

The figures chose the order of node.selection.ranked (finer slices before axial).

Usage: python benchmarks/slice_pitch.py [--model DIR] [--data DIR] [--cases N] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED_DATA, markdown_table, save_result

sys.path.insert(0, str(REPO))
from converters.reorient import volume_ras_affine
from converters.resample import resample_to_grid
from converters.reslice import SeriesPlan
from converters.volume import Volume
from trainer.metrics import dice

PLANS = {
    "axial 5 mm": SeriesPlan("axial", slice_thickness_mm=5.0),
    "axial 3 mm": SeriesPlan("axial", slice_thickness_mm=3.0),
    "sagittal 3D 1 mm": SeriesPlan("sagittal", pixel_spacing_mm=1.0, slice_thickness_mm=1.0),
    "axial 1 mm": SeriesPlan("axial"),
}


def on_case_grid(
    labels: npt.NDArray[np.bool_], volume: Volume, case_affine: npt.NDArray[Any], shape: tuple[int, int, int]
) -> npt.NDArray[np.bool_]:
    """``labels`` on ``volume``'s frames (slice, row, column) taken, nearest voxel, onto the case's
    (X, Y, Z) grid whose affine maps to RAS (the node's own resampling, order 0)."""
    xyz = np.transpose(labels.astype(np.uint8), (2, 1, 0))
    return np.asarray(resample_to_grid(xyz, volume_ras_affine(volume), case_affine, shape, order=0) > 0)


def seg_of(received: list[Any], study_uid: str) -> Any:
    """The SEG of ``study_uid`` among the received data sets, or None."""
    return next((d for d in received if d.Modality == "SEG" and d.StudyInstanceUID == study_uid), None)


def score_case(node: Any, catcher: Any, case: Any, tmp: Path) -> list[dict[str, Any]]:
    """Every acquisition of :data:`PLANS` of ``case`` through ``node``; a row per acquisition."""
    import highdicom as hd

    from converters.dicom_series import load_series
    from converters.dicom_writer import write_volumes
    from converters.reslice import reslice_case
    from node.sender import store_files

    truth = case.label > 0
    rows = []
    for name, plan in PLANS.items():
        resliced = reslice_case(case, plan, ["FLAIR"])
        assert resliced.label is not None
        folder = tmp / f"{case.case_id}_{name.replace(' ', '_')}"
        study = write_volumes(resliced.volumes, folder, descriptions={"FLAIR": f"{name} FLAIR"})
        files = study.files["FLAIR"]
        sent = store_files(files, "127.0.0.1", node.scp.port, "SEGNODE", "PACS")
        if {status for _, status, _ in sent} != {0}:
            raise RuntimeError(f"{case.case_id} {name}: C-STORE failed: {sent}")
        uid = study.study_instance_uid
        received = catcher.wait_for(lambda r: seg_of(r, uid) is not None, 300)  # noqa: B023 (waited here)
        volume = load_series(files)
        labels = hd.seg.Segmentation.from_dataset(seg_of(received, uid)).get_pixels_by_source_instance(
            source_sop_instance_uids=volume.sop_instance_uids,
            segment_numbers=[1],
            assert_missing_frames_are_empty=True,
        )[..., 0] > 0
        predicted = on_case_grid(labels, volume, case.affine, truth.shape)
        row = {
            "case": case.case_id, "acquisition": name, "dice_1mm": dice(predicted, truth),
            "dice_own_grid": dice(labels, resliced.label > 0),
            "predicted_ml": float(predicted.sum()) / 1000.0, "truth_ml": float(truth.sum()) / 1000.0,
        }  # fmt: skip
        rows.append(row)
        print(f"{case.case_id} {name}: Dice on the 1 mm truth {row['dice_1mm']:.4f}, "
              f"on its own grid {row['dice_own_grid']:.4f}", flush=True)  # fmt: skip
    return rows


def summary(rows: list[dict[str, Any]]) -> str:
    """Per acquisition: mean Dice both ways, and on how many cases it fell below the 3D series."""
    reference = {r["case"]: r["dice_1mm"] for r in rows if r["acquisition"] == "sagittal 3D 1 mm"}
    table = []
    for name in PLANS:
        mine = [r for r in rows if r["acquisition"] == name]
        worse = sum(r["dice_1mm"] < reference[r["case"]] for r in mine)
        table.append([
            name, len(mine), f"{statistics.mean(r['dice_1mm'] for r in mine):.4f}",
            f"{statistics.mean(r['dice_own_grid'] for r in mine):.4f}", f"{worse} of {len(mine)}",
        ])  # fmt: skip
    headers = ["acquisition", "cases", "mean Dice, the case's 1 mm truth", "mean Dice, its own grid",
               "below sagittal 3D 1 mm on"]  # fmt: skip
    return markdown_table(headers, table)


def main() -> int:
    from converters.nifti import list_cases, load_case
    from node.config import Destination
    from tests.helpers.node import CatchingSCP, node_settings, running_node
    from tests.helpers.ports import free_port

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "train" / "brats")
    parser.add_argument("--cases", type=int, default=0, help="the first N cases only (0: all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    refs = list_cases(args.data, require_labels=True)
    refs = refs[: args.cases] if args.cases else refs
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slice-pitch-") as tmp_name:
        tmp = Path(tmp_name)
        catcher = CatchingSCP().start(free_port())
        pacs = [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)]
        try:
            with running_node(node_settings(tmp, free_port(), pacs), args.model) as node:
                for ref in refs:
                    rows += score_case(node, catcher, load_case(ref.path), tmp)
        finally:
            catcher.stop()
    print(summary(rows))
    print(f"saved {save_result('slice_pitch', {'model': str(args.model), 'rows': rows}, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
