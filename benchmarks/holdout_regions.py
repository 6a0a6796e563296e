"""Tumour sub-regions through the whole node: four DICOM series in over a socket, SEG out, per region.

Each case (FLAIR, T1, T1GD, T2 and its label) is written as a four-series DICOM study on the case's
own axial grid, sent to an in-process node serving the sub-region model under test (routing as
shipped: ``brats_regions`` when all four series are there and co-registration passes, else the
shipped whole-tumour model; brain extraction active), and the SEG that comes back is read with
highdicom on the FLAIR series' frames. Its segments are told apart by their property type code
(edema, necrosis / non-enhancing, enhancing: db/card.py ``TASK_LABELS``), and scored as the BraTS
regions: whole tumour (all three), tumour core (non-enhancing + enhancing), enhancing tumour.

Acquisitions:

- ``aligned``: the four series as BraTS registered them;
- ``misaligned``: T1, T1GD and T2 moved by a known rigid motion each (a few degrees and millimetres,
  different per series, the motions of ``tests/helpers/regions.py``) before they are written: the
  node must register them back. The label stays with the unmoved FLAIR;
- ``sagittal FLAIR``: the FLAIR re-acquired as a 3D sagittal series of 1 mm (the reference grid, and
  the one the label is scored on), T1, T1GD and T2 as in ``aligned``.

A study the node routes to the whole-tumour model (its SEG has the one whole-tumour segment) is scored
as WT only: TC and ET 0, whatever the truth holds (even a case without enhancing tumour, whose ET Dice
would otherwise be 1), counted in the means; the row's task says so and the table counts such studies.
Otherwise a region empty in both the truth and the SEG scores 1 (the BraTS convention).
This is a final-evaluation script: the holdout may be read here (``--data`` is required), nothing
is tuned on its output.

Usage: python benchmarks/holdout_regions.py --data ../shared/data/holdout
       --model models/candidates/segnode-brats-regions-1.2.0 [--precision int8] [--cases N] [--out DIR]
       python benchmarks/holdout_regions.py --data ../shared/data/train --folds runs/f0/export ...
       (cross-validation: each fold's export on the cases its run validated on, pooled; see
       ``segnode crossval`` for the same without the node)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, peak_rss_mib, save_result
from holdout_node import _Receiver, labelled_cases, serving, wait_for_seg

#: Per series: rotations about x, y, z (degrees) and translation (mm), about the brain's centre.
MOTIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "T1": ((3.0, -2.0, 4.0), (4.0, -3.0, 2.0)),
    "T1GD": ((-4.0, 2.0, -2.0), (-3.0, 5.0, -2.0)),
    "T2": ((2.0, 4.0, -3.0), (2.0, 2.0, -5.0)),
}
ACQUISITIONS = ("aligned", "misaligned", "sagittal FLAIR")
SERIES = ("FLAIR", "T1", "T1GD", "T2")
#: SEG property type code -> Decathlon label.
TISSUE_CODES = {"79654002": 1, "6574001": 2, "C81175": 2, "C113842": 3}
REGIONS = {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks (1.0 when both are empty)."""
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def region_scores(predicted: np.ndarray, truth: np.ndarray, voxel_ml: float,
                  whole_tumour_only: bool) -> dict[str, Any]:
    """Dice and volumes (predicted, true mL) per region; a whole-tumour SEG scores TC and ET 0."""
    row: dict[str, Any] = {}
    for region, members in REGIONS.items():
        p, t = np.isin(predicted, members), np.isin(truth, members)
        row[region] = 0.0 if whole_tumour_only and region != "WT" else round(dice(p, t), 4)
        row[f"{region}_ml"] = [round(float(p.sum()) * voxel_ml, 2), round(float(t.sum()) * voxel_ml, 2)]
    if whole_tumour_only:
        row["scored"] = "WT only: the whole-tumour model's SEG, TC and ET 0"
    return row


def _is_whole_tumour_seg(raw: Any) -> bool:
    """Whether a SEG has no sub-region segment (the whole-tumour model's one segment)."""
    codes = {str(item.SegmentedPropertyTypeCodeSequence[0].CodeValue) for item in raw.SegmentSequence}
    return not codes & TISSUE_CODES.keys()


def _labels_from_seg(raw: Any, sop_uids: list[str]) -> np.ndarray:
    """The SEG as Decathlon labels on the source frames (slice, row, column)."""
    import highdicom as hd

    seg = hd.seg.Segmentation.from_dataset(raw)
    numbers, values = [], []
    for item in seg.SegmentSequence:
        code = str(item.SegmentedPropertyTypeCodeSequence[0].CodeValue)
        numbers.append(int(item.SegmentNumber))
        values.append(TISSUE_CODES.get(code, 1))  # the whole-tumour model's one segment: WT only
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=sop_uids, segment_numbers=numbers, assert_missing_frames_are_empty=True
    )
    labels = np.zeros(pixels.shape[:-1], dtype=np.uint8)
    for k, value in enumerate(values):
        labels[pixels[..., k] > 0] = value
    return labels


def _score(node: Any, receiver: _Receiver, case: Any, name: str, workdir: Path) -> dict[str, Any]:
    from converters.dicom_series import load_series
    from converters.dicom_writer import write_volumes
    from converters.registration import move_series
    from converters.resample import world_points
    from converters.reslice import SeriesPlan, reslice_case
    from node.sender import store_files

    if name == "misaligned":
        brain = np.argwhere(case.images["FLAIR"] > 0).mean(axis=0, keepdims=True)
        images, _ = move_series(case.images, case.affine, MOTIONS, world_points(case.affine, brain)[0])
        case = dataclasses.replace(case, images=images)
    resliced = reslice_case(case, SeriesPlan("axial"), list(SERIES))
    volumes = dict(resliced.volumes)
    if name == "sagittal FLAIR":  # a 3D FLAIR, the reference grid the labels come back on
        resliced = reslice_case(case, SeriesPlan("sagittal"), ["FLAIR"])
        volumes["FLAIR"] = resliced.volumes["FLAIR"]
    assert resliced.label is not None
    truth = np.asarray(resliced.label)
    study = write_volumes(volumes, workdir / f"{case.case_id}_{name.replace(' ', '_')}")
    files = [f for m in SERIES for f in study.files[m]]
    start = time.perf_counter()
    results = store_files(files, "127.0.0.1", node.scp.port, "SEGNODE", "EVAL")
    row: dict[str, Any] = {"case": case.case_id, "acquisition": name}
    if {status for _, status, _ in results} != {0}:
        return {**row, "error": "C-STORE refused", **{r: 0.0 for r in REGIONS}}
    raw, held, job = wait_for_seg(node, receiver, study.study_instance_uid, 600)
    row["seconds"] = round(time.perf_counter() - start, 2)
    if held and raw is not None:
        row["held"] = held
    routing = (job.result or {}).get("routing", {}) if job is not None else {}
    row["task"] = routing.get("task") if isinstance(routing, dict) else None
    row["routing"] = routing.get("reason") if isinstance(routing, dict) else None
    if raw is None:
        return {**row, "error": f"no SEG: {held}", **{r: 0.0 for r in REGIONS}}
    volume = load_series(study.files["FLAIR"])
    predicted = _labels_from_seg(raw, volume.sop_instance_uids)
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    return {**row, **region_scores(predicted, truth, voxel_ml, _is_whole_tumour_seg(raw))}


def evaluate(
    model: Path,
    precision: str,
    data: Path,
    acquisitions: list[str],
    cases: int,
    only: Collection[str] | None = None,
) -> dict[str, Any]:
    """Every complete four-sequence case of ``data`` (those named in ``only`` when given) through a node
    serving ``model`` (and routing)."""
    rows: list[dict[str, Any]] = []
    with serving(model, precision) as (node, receiver, workdir):
        for ref in labelled_cases(data, cases):
            if only is not None and ref.case_id not in only:
                continue
            case = ref.load()
            if any(m not in case.images for m in SERIES):
                print(f"{case.case_id}: not all four sequences, skipped", flush=True)
                continue
            for name in acquisitions:
                row = _score(node, receiver, case, name, workdir)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return {"model": str(model), "precision": precision, "cases": rows, "mean": _means(rows, acquisitions)}


def _means(rows: list[dict[str, Any]], acquisitions: list[str]) -> dict[str, dict[str, float]]:
    """Per acquisition, each region's mean over the rows of that acquisition; with more than one
    acquisition, ``"all"``: over every row."""
    means = {
        name: {r: round(float(np.mean([x[r] for x in rows if x["acquisition"] == name])), 4) for r in REGIONS}
        for name in acquisitions
        if any(x["acquisition"] == name for x in rows)
    }
    if len(means) > 1:
        means["all"] = {r: round(float(np.mean([x[r] for x in rows])), 4) for r in REGIONS}
    return means


def evaluate_folds(models: list[Path], precision: str, data: Path, acquisitions: list[str]) -> dict[str, Any]:
    """Cross-validation through the node: each fold's model (``segnode export`` of a ``segnode train
    --folds K --fold I`` run) on the cases its run validated on (its card's ``training.split.val``),
    found in ``data``, and the folds pooled: every case once, by the one model that did not train on it.

    Raises
    ------
    SystemExit
        A fold validated on a case missing from ``data``, or two folds on one case.
    """
    from trainer.evaluate import fold_validation_sets
    from trainer.exceptions import TrainerError

    found = {ref.case_id for ref in labelled_cases(data)}
    try:
        sets = fold_validation_sets(models, [str(m) for m in models], found, data)
    except TrainerError as exc:
        raise SystemExit(str(exc)) from None
    rows: list[dict[str, Any]] = []
    for model, val in zip(models, sets, strict=True):
        result = evaluate(model, precision, data, acquisitions, 0, only=set(val))
        rows += [{"fold": str(model), **row} for row in result["cases"]]
    return {"model": [str(m) for m in models], "precision": precision, "cases": rows,
            "mean": _means(rows, acquisitions)}


def case_means(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per case, each region's mean over the case's acquisitions."""
    cases = dict.fromkeys(r["case"] for r in rows)
    return {
        case: {g: round(float(np.mean([r[g] for r in rows if r["case"] == case])), 4) for g in REGIONS}
        for case in cases
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument("--model", type=Path)
    models.add_argument(
        "--folds", type=Path, nargs="+", metavar="MODEL",
        help="cross-validation: each fold's export scored on the cases its run validated on, pooled",
    )
    parser.add_argument("--precision", choices=["fp32", "int8"], default="int8")
    parser.add_argument("--acquisitions", default=",".join(ACQUISITIONS))
    parser.add_argument("--cases", type=int, default=0, help="the first N cases only (0: all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    acquisitions = [a for a in args.acquisitions.split(",") if a]
    if unknown := [a for a in acquisitions if a not in ACQUISITIONS]:
        parser.error(f"unknown acquisition {unknown[0]!r}; choose from {', '.join(ACQUISITIONS)}")
    if args.folds:
        result = evaluate_folds(args.folds, args.precision, args.data, acquisitions)
    else:
        result = evaluate(args.model, args.precision, args.data, acquisitions, args.cases)
    rows = [
        [
            r["case"],
            r["acquisition"],
            r.get("task") or "-",
            *[f"{r[g]:.4f}" for g in REGIONS],
            f"{r.get('seconds', 0):.1f}",
        ]
        for r in result["cases"]
    ]
    rows += [
        ["**mean**", name, "", *[f"**{m[g]:.4f}**" for g in REGIONS], ""]
        for name, m in result["mean"].items()
    ]
    table = markdown_table(["case", "acquisition", "model task", "WT", "TC", "ET", "s"], rows)
    if len({r["case"] for r in result["cases"]}) > 1:
        per_case = case_means(result["cases"]).items()
        by_case = [[case, *[f"{m[g]:.4f}" for g in REGIONS]] for case, m in per_case]
        table += "\n\nEach case over its acquisitions:\n\n" + markdown_table(["case", *REGIONS], by_case)
    if held := sum(1 for r in result["cases"] if r.get("held")):
        table += f"\n\n{held} of {len(result['cases'])} studies held for review."
    if fallback := sum(1 for r in result["cases"] if "scored" in r):
        table += (f"\n\n{fallback} of {len(result['cases'])} studies came back from the whole-tumour model: "
                  "scored WT only, TC and ET 0 (in the means).")
    print(table)
    # The node runs in this process beside the DICOM writer and the scoring: the node's own memory
    # (issue 16's 1.5 GiB) is benchmarks/registration.py's figure, not this one.
    print(f"peak RSS of this script (node, DICOM writer, scoring together) {peak_rss_mib():.0f} MiB")
    path = save_result("holdout_regions", {**result, "markdown": table}, args.out)
    print(f"results in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
