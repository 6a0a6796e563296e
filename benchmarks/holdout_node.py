"""Whole-tumour Dice through the whole node: DICOM in over a socket, SEG out, scored against the truth.

Each case (FLAIR and its label) is re-acquired with :func:`converters.reslice.reslice_case` as the
scanner would write it, written as a DICOM series, sent to an in-process node (``NodeService``: the
SCP, the job queue, brain extraction when a brain-extraction model is active, preprocessing in world
space, OpenVINO, SEG) serving the model under test, and the SEG that comes back is read with highdicom
on the series' own frames and scored against the label resampled alongside; the same SEG is also
taken back, nearest voxel, onto the case's own grid and scored against the case's own label
(``dice_case_grid``, benchmarks/slice_pitch.py ``on_case_grid``): one truth for every acquisition,
where the first score gives a thick-slice series a truth as coarse as itself. Acquisitions:

- ``axial 1 mm``: the case's own grid (the reference);
- ``sagittal``, ``coronal``, ``oblique 20°``, ``axial 5 mm``: re-acquired in world space;
- ``degraded``: a fixed, seeded degradation, the same for every model compared: axial 5 mm slices,
  a bias field (±0.3 in log) and Rician noise (3 % of the brain's 99th percentile), seed 2026.

This is the final-evaluation script: it is the only place the holdout may be read (``--data`` is
required, nothing is tuned on its output). ``--model`` may be given several times to compare models
on the same acquisitions; the table gives each model's mean per acquisition and the difference.
``--mirror`` (``[inference] mirror``, node/segmenter.py) and ``--views`` (1 or 3: ``[inference]
three_views`` empty or naming every task, converters/prediction.py) may be given several times too: each
model is served once per combination.
Each row also records the job's ``inference`` stage time (``infer_seconds``), the tumour's share of
the node's brain mask (``share_of_brain_percent``) and the QC cautions sent (``cautions``).
The same script scores validation cases when ``--data`` names a folder of them (e.g. symlinks to
the split's validation cases under ../shared/data/train): that is where settings are chosen.
``--folds`` does the same for cross-validation (``segnode train --folds K --fold I``, exported): each
fold's export on its own validation cases under ``--data``, pooled as one recipe; given again, another
recipe's folds, compared per acquisition and per case.
A case stored z-scored (the BraTS 2013 ones) is sent as a skull-stripped scanner image would be, whole
numbers from 1 up inside its brain (:func:`converters.nifti.scanner_intensities`): written from its
z-scores, brain extraction finds no brain in it.

Usage: python benchmarks/holdout_node.py --data ../shared/data/holdout --model models/default
       [--model runs/x/export] [--precision int8] [--mirror none --mirror lr] [--views 1 --views 3]
       [--acquisitions axial_1mm,degraded] [--out DIR]
       python benchmarks/holdout_node.py --data DIR --folds runs/a-f0/export ... [--folds runs/b-f0/export ..]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, peak_rss_mib, save_result
from slice_pitch import on_case_grid

from converters.nifti import scanner_intensities
from converters.reslice import SeriesPlan
from trainer.metrics import dice as mask_dice

ACQUISITIONS: dict[str, SeriesPlan] = {
    "axial_1mm": SeriesPlan("axial"),
    "sagittal": SeriesPlan("sagittal", pixel_spacing_mm=0.94, slice_thickness_mm=1.2),
    "coronal": SeriesPlan("coronal", pixel_spacing_mm=0.8, slice_thickness_mm=3.0),
    "oblique_20": SeriesPlan("oblique", tilt_degrees=20.0),
    "axial_5mm": SeriesPlan("axial", slice_thickness_mm=5.0),
    "degraded": SeriesPlan("axial", slice_thickness_mm=5.0, bias_field=0.3, seed=2026),
}
#: Rician noise of the ``degraded`` acquisition, as a share of the brain's 99th percentile.
DEGRADED_NOISE = 0.03
DEGRADED_SEED = 2026


def _add_noise(array: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Rician noise (magnitude of complex Gaussian noise), as an MR magnitude image has."""
    rng = np.random.default_rng(seed)
    top = float(np.percentile(array[array > 0], 99)) if (array > 0).any() else 1.0
    sigma = share * top
    real = array + rng.normal(0.0, sigma, array.shape)
    imag = rng.normal(0.0, sigma, array.shape)
    return np.rint(np.sqrt(real**2 + imag**2)).astype(np.float32)


class _Receiver:
    """A storage SCP on loopback that keeps the SEGs and SRs it receives."""

    def __init__(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            Comprehensive3DSRStorage,
            SegmentationStorage,
        )

        self.received: list[Any] = []
        self.changed = threading.Condition()
        ae = AE(ae_title="EVAL_PACS")
        ae.add_supported_context(SegmentationStorage, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Comprehensive3DSRStorage, ALL_TRANSFER_SYNTAXES)
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on)])
        assert server is not None  # block=False returns the running server
        self.server = server
        self.port = int(server.server_address[1])

    def _on(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.changed:
            self.received.append(ds)
            self.changed.notify_all()
        return 0x0000

    def wait_for(self, study_uid: str, modality: str, timeout: float) -> Any | None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                found = [
                    d for d in self.received if d.StudyInstanceUID == study_uid and d.Modality == modality
                ]
                if found:
                    return found[-1]
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(left)

    def stop(self) -> None:
        self.server.shutdown()


def wait_for_seg(
    node: Any, receiver: _Receiver, study_uid: str, timeout: float
) -> tuple[Any | None, str | None, Any | None]:
    """The SEG the node sent for ``study_uid`` and None; for a study held for review (a QC rule), the
    SEG it wrote and did not send, and ``held: <reason>`` (what a release would send: scored, flagged);
    None and the reason when its job ended without a SEG, or after ``timeout`` seconds. Third, the
    study's latest job as last read (None: no job yet). A held study used to keep the run waiting the
    whole timeout for a SEG that never comes."""
    import pydicom

    from db import job_queue

    def latest_job() -> Any | None:
        jobs = [j for j in job_queue.list_jobs(node.sf) if j.study_instance_uid == study_uid]
        return jobs[-1] if jobs else None

    deadline = time.monotonic() + timeout
    while True:
        raw = receiver.wait_for(study_uid, "SEG", 2.0)
        if raw is not None:
            return raw, None, latest_job()
        job = latest_job()
        written = (job.result or {}).get("seg") if job is not None else None
        if job is not None and job.status == "review" and written and Path(written).is_file():
            return pydicom.dcmread(written), f"held: {job.reason}", job
        no_seg = job is not None and job.status == "done" and not written  # no tumour: an SR alone
        if job is not None and (job.status in ("failed", "skipped", "review") or no_seg):
            return None, job.reason or f"job {job.status} without a SEG", job
        if time.monotonic() > deadline:
            return None, job.reason if job is not None else "no job", job


def _node(
    workdir: Path, model: Path, precision: str, receiver: _Receiver, mirror: str = "none", views: int = 1
) -> Any:
    from db.exceptions import PromotionRefused
    from node.config import Destination, Settings
    from node.service import NodeService

    settings = Settings()
    settings.node.host, settings.node.port = "127.0.0.1", 0
    settings.node.spool_dir = str(workdir / "spool")
    settings.node.study_idle_seconds, settings.node.poll_seconds = 0.5, 0.05
    settings.node.min_free_disk_mb = 50
    settings.database.url = f"sqlite:///{workdir / 'node.db'}"
    settings.metrics.port = 0
    settings.destinations = [Destination("eval", "EVAL_PACS", "127.0.0.1", receiver.port)]
    settings.inference.mirror = mirror
    settings.inference.three_views = ["whole_tumor", "brats_regions"] if views == 3 else []
    node = NodeService(settings)
    infos = node.registry.import_dir(model, by="holdout_node.py")
    irs = [i for i in infos if i.kind == "ir" and i.precision == precision]
    if not irs:
        node.stop()
        raise SystemExit(f"{model}: no {precision} IR in model.json")
    try:
        node.registry.promote(irs[0].id, by="holdout_node.py", reason="final evaluation")
    except PromotionRefused:
        node.registry.promote(irs[0].id, by="holdout_node.py", reason="final evaluation", force=True)
    node.start()
    return node


@dataclass
class Sent:
    """One acquisition of a case sent through the node, and its SEG read back."""

    #: The SEG's tumour on the series' own frames (slice, row, column), and the case's label resliced there.
    predicted: np.ndarray
    truth: np.ndarray
    #: The same SEG taken onto the case's own (X, Y, Z) grid (:func:`slice_pitch.on_case_grid`).
    on_case: np.ndarray
    voxel_ml: float
    seconds: float
    job: Any
    held: str | None


def send_and_read(node: Any, receiver: _Receiver, case: Any, name: str, workdir: Path) -> Sent | str:
    """``case`` re-acquired as acquisition ``name``, written as a FLAIR study, sent to ``node`` and its
    SEG read back (the one it wrote when the study was held); the reason when no SEG came."""
    import highdicom as hd

    from converters.dicom_series import load_series
    from converters.dicom_writer import write_volumes
    from converters.reslice import reslice_case
    from node.sender import store_files

    plan = ACQUISITIONS[name]
    resliced = reslice_case(case, plan, ["FLAIR"])
    volumes = dict(resliced.volumes)
    if name == "degraded":
        volume = volumes["FLAIR"]
        volumes["FLAIR"] = replace(volume, array=_add_noise(volume.array, DEGRADED_NOISE, DEGRADED_SEED))
    assert resliced.label is not None
    truth = resliced.label > 0
    folder = workdir / f"{case.case_id}_{name}"
    study = write_volumes(volumes, folder, descriptions={"FLAIR": f"{name} FLAIR"})
    start = time.perf_counter()
    results = store_files(study.files["FLAIR"], "127.0.0.1", node.scp.port, "SEGNODE", "EVAL")
    if {status for _, status, _ in results} != {0}:
        return "C-STORE refused"
    raw, held, job = wait_for_seg(node, receiver, study.study_instance_uid, 300)
    seconds = time.perf_counter() - start
    if raw is None:
        return f"no SEG: {held}"
    seg = hd.seg.Segmentation.from_dataset(raw)
    volume = load_series(study.files["FLAIR"])
    labels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=volume.sop_instance_uids,
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )[..., 0]
    predicted = labels > 0
    return Sent(
        predicted=predicted,
        truth=truth,
        on_case=on_case_grid(predicted, volume, case.affine, case.label.shape),
        voxel_ml=float(np.prod(volume.spacing)) / 1000.0,
        seconds=seconds,
        job=job,
        held=held,
    )


def _score(node: Any, receiver: _Receiver, case: Any, name: str, workdir: Path) -> dict[str, Any]:
    sent = send_and_read(node, receiver, case, name, workdir)
    if isinstance(sent, str):
        dice = None if sent == "C-STORE refused" else 0.0
        return {"case": case.case_id, "acquisition": name, "dice": dice, "error": sent}
    job = sent.job
    infer_seconds = job.stages.get("inference") if job is not None else None
    result = (job.result or {}) if job is not None else {}
    cautions = [c["name"] for c in (result.get("qc") or {}).get("cautions", [])]
    return {
        "case": case.case_id,
        "acquisition": name,
        "dice": round(mask_dice(sent.predicted, sent.truth), 4),
        # The same SEG on the case's own grid against its own label: one truth for every acquisition.
        "dice_case_grid": round(mask_dice(sent.on_case, case.label > 0), 4),
        "predicted_ml": round(float(sent.predicted.sum()) * sent.voxel_ml, 2),
        "truth_ml": round(float(sent.truth.sum()) * sent.voxel_ml, 2),
        "seconds": round(sent.seconds, 2),
        "infer_seconds": None if infer_seconds is None else round(float(infer_seconds), 3),
        # The node's own figures: the tumour's share of its brain mask and the QC cautions sent with it.
        "share_of_brain_percent": result.get("tumour_share_of_brain_percent"),
        **({"held": sent.held} if sent.held else {}),
        **({"cautions": cautions} if cautions else {}),
    }


@contextmanager
def serving(
    model: Path, precision: str, mirror: str = "none", views: int = 1
) -> Iterator[tuple[Any, _Receiver, Path]]:
    """A started in-process node serving ``model`` (``precision`` IR, ``[inference] mirror`` ``mirror``,
    its network along ``views`` 1 or 3 axes), its receiving PACS and a work folder; all three are stopped
    and removed on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="segnode-holdout-"))
    receiver = _Receiver()
    try:
        node = _node(workdir, model, precision, receiver, mirror, views)
        try:
            yield node, receiver, workdir
        finally:
            node.stop()
    finally:
        receiver.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def labelled_cases(data: Path, cases: int = 0, only: Collection[str] | None = None) -> list[Any]:
    """The labelled cases of ``data`` (those named in ``only`` when given), the first ``cases`` when > 0."""
    from converters.nifti import list_cases

    refs = list_cases(data, require_labels=True, allow_holdout=True)  # the final evaluation
    if only is not None:
        refs = [r for r in refs if r.case_id in only]
    return refs[:cases] if cases > 0 else refs


def evaluate(
    model: Path,
    precision: str,
    data: Path,
    acquisitions: list[str],
    cases: int = 0,
    mirror: str = "none",
    views: int = 1,
    only: Collection[str] | None = None,
) -> dict[str, Any]:
    """Every case of ``data`` (those named in ``only`` when given; the first ``cases`` when > 0) in every
    acquisition through a node serving ``model`` with ``[inference] mirror`` ``mirror``, its network
    along ``views`` 1 or 3 axes."""
    rows: list[dict[str, Any]] = []
    with serving(model, precision, mirror, views) as (node, receiver, workdir):
        for ref in labelled_cases(data, cases, only):
            case = scanner_intensities(ref.load())  # a z-scored case as a scanner writes it
            for name in acquisitions:
                row = _score(node, receiver, case, name, workdir)
                print(
                    f"{model_label(model)} {precision} mirror={mirror} views={views} {row['case']} {name}: "
                    f"Dice {row['dice']}"
                    f" infer {row.get('infer_seconds')} s",
                    flush=True,
                )
                rows.append(row)
    return summarise(str(model), precision, rows, acquisitions, mirror, views)


def summarise(
    model: str,
    precision: str,
    rows: list[dict[str, Any]],
    acquisitions: list[str],
    mirror: str = "none",
    views: int = 1,
) -> dict[str, Any]:
    """The rows of one model (or one recipe's folds) with their means per acquisition on both scores and
    the mean inference stage time."""
    means = {
        name: round(float(np.mean([r["dice"] or 0.0 for r in rows if r["acquisition"] == name])), 4)
        for name in acquisitions
    }
    case_grid = {
        n: round(float(np.mean([r.get("dice_case_grid") or 0.0 for r in rows if r["acquisition"] == n])), 4)
        for n in acquisitions
    }
    timed = [r["infer_seconds"] for r in rows if r.get("infer_seconds") is not None]
    return {
        "model": model,
        "precision": precision,
        "mirror": mirror,
        "views": views,
        "cases": rows,
        "mean": means,
        "mean_case_grid": case_grid,
        "mean_infer_seconds": round(float(np.mean(timed)), 3) if timed else None,
    }


def fold_cases(models: list[Path], data: Path) -> list[list[str]]:
    """Each cross-validation fold's validation cases (its card's ``training.split.val``) found under
    ``data``, in the order of ``models``. ``data`` may hold only some of them: a fold's other validation
    cases are named on stdout and left out.

    Raises
    ------
    SystemExit
        Two folds validated on one case, or a fold has no validation case under ``data``.
    """
    from converters.exceptions import ModelCardError
    from trainer.evaluate import fold_validation_cases, fold_validation_sets
    from trainer.exceptions import TrainerError

    found = {ref.case_id for ref in labelled_cases(data)}
    try:
        wanted = [fold_validation_cases(m) for m in models]
        fold_validation_sets(models, [str(m) for m in models], {c for w in wanted for c in w}, data)
    except (ModelCardError, TrainerError) as exc:
        raise SystemExit(str(exc)) from None
    sets = []
    for model, val in zip(models, wanted, strict=True):
        kept = [c for c in val if c in found]
        if not kept:
            raise SystemExit(f"{model} validated on {', '.join(val)}: none of them is under {data}")
        if left := [c for c in val if c not in found]:
            print(f"{model}: {', '.join(left)} not under {data}, left out", flush=True)
        sets.append(kept)
    return sets


def model_label(model: Path | str) -> str:
    """A model directory's name in the tables: its run's (the folder above) when it is ``export``, which
    every ``segnode export`` writes, so that runs/a/export and runs/b/export are told apart."""
    path = Path(model)
    return path.parent.name if path.name == "export" else path.name


def folds_label(models: list[Path]) -> str:
    """A name for one recipe's folds: its first and last fold's run (the folder above ``export``)."""
    if len(models) == 1:
        return f"{model_label(models[0])} (1 fold)"
    return f"{model_label(models[0])} .. {model_label(models[-1])} ({len(models)} folds)"


def evaluate_folds(models: list[Path], precision: str, data: Path, acquisitions: list[str]) -> dict[str, Any]:
    """Cross-validation through the node: each fold's model (``segnode export`` of a ``segnode train
    --folds K --fold I`` run) on its validation cases under ``data`` (:func:`fold_cases`), pooled as one
    model's result: every case once, by the one model that did not train on it (each row names its
    ``fold``)."""
    rows: list[dict[str, Any]] = []
    for model, val in zip(models, fold_cases(models, data), strict=True):
        result = evaluate(model, precision, data, acquisitions, only=set(val))
        rows += [{"fold": str(model), **row} for row in result["cases"]]
    return summarise(folds_label(models), precision, rows, acquisitions)


def case_means(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per case, its Dice's mean over the case's acquisitions (a study without a SEG counts 0)."""
    cases = dict.fromkeys(r["case"] for r in rows)
    return {c: round(float(np.mean([r["dice"] or 0.0 for r in rows if r["case"] == c])), 4) for c in cases}


def case_table(results: list[dict[str, Any]]) -> str:
    """Each case's mean over its acquisitions, one column per result, and the last minus the first."""
    means = [case_means(r["cases"]) for r in results]
    rows = [
        [case, *[f"{m[case]:.4f}" if case in m else "-" for m in means],
         f"{means[-1][case] - means[0][case]:+.4f}" if case in means[0] and case in means[-1] else "-"]
        for case in dict.fromkeys(c for m in means for c in m)
    ]  # fmt: skip
    headers = ["case", *[model_label(r["model"]) for r in results], "difference (last - first)"]
    return markdown_table(headers, rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument("--model", type=Path, action="append")
    models.add_argument(
        "--folds", type=Path, nargs="+", action="append", metavar="MODEL",
        help="one recipe's cross-validation folds: each export scored on its validation cases under "
        "--data, pooled; given again for another recipe",
    )  # fmt: skip
    parser.add_argument("--precision", choices=["fp32", "int8"], default="int8")
    parser.add_argument("--acquisitions", default=",".join(ACQUISITIONS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cases", type=int, default=0, help="the first N cases only (0: all)")
    parser.add_argument(
        "--mirror", action="append", choices=["none", "lr", "lr+ap"], help="[inference] mirror (default none)"
    )
    parser.add_argument(
        "--views", action="append", type=int, choices=[1, 3],
        help="3: [inference] three_views names every task (default 1: none)",
    )  # fmt: skip
    args = parser.parse_args()
    acquisitions = [a for a in args.acquisitions.split(",") if a]
    unknown = [a for a in acquisitions if a not in ACQUISITIONS]
    if unknown:
        parser.error(f"unknown acquisition {unknown[0]!r}; choose from {', '.join(ACQUISITIONS)}")
    mirrors = args.mirror or ["none"]
    if args.folds and (args.mirror or args.views or args.cases):
        parser.error("--folds serves each fold with the node defaults; leave out --mirror, --views, --cases")
    if args.folds:
        results = [evaluate_folds(group, args.precision, args.data, acquisitions) for group in args.folds]
    else:
        results = [
            evaluate(m, args.precision, args.data, acquisitions, args.cases, mirror, views)
            for m in args.model
            for mirror in mirrors
            for views in args.views or [1]
        ]
    headers = [
        "acquisition",
        *[
            f"{model_label(r['model'])} ({r['precision']}, mirror {r['mirror']}, views {r['views']})"
            for r in results
        ],
    ]
    if len(results) > 1:
        headers.append("difference (last - first)")
    rows = []
    for name in acquisitions:
        values = [r["mean"][name] for r in results]
        row: list[Any] = [name, *[f"{v:.4f}" for v in values]]
        if len(results) > 1:
            row.append(f"{values[-1] - values[0]:+.4f}")
        rows.append(row)
    seconds = ["inference stage, s (mean per job)", *[str(r["mean_infer_seconds"]) for r in results]]
    rows.append(seconds + [""] * (len(headers) - len(seconds)))
    print(markdown_table(headers, rows))
    print("\nThe same SEGs on each case's own grid, against its own label (one truth for every acquisition):")
    print(markdown_table(
        headers[: 1 + len(results)],
        [[name, *[f"{r['mean_case_grid'][name]:.4f}" for r in results]] for name in acquisitions],
    ))  # fmt: skip
    if len(results) > 1:
        print("\nPer case, the mean over its acquisitions:")
        print(case_table(results))
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    path = save_result("holdout_node", {"runs": results}, args.out)
    print(f"results in {path}")
    means = [
        {"model": model_label(r["model"]), "mirror": r["mirror"], "views": r["views"], **r["mean"]}
        for r in results
    ]
    print(json.dumps(means))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
