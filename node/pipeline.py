"""One job, start to end: select series, route to a model, assemble volumes, extract the brain,
co-register, segment, write SEG + SR + preview.

Routing: the active model of each task of ``[routing] order`` is tried, most capable first; a model
runs when every series its card asks for is in the study and can be read, and (several series) each
one's registration onto the reference series passed its check (``register`` stage,
node/coregistration.py); otherwise the next one. The result's ``routing`` (also in ``segnode jobs
show`` and the SR) says which model ran and why the ones before it did not.

The brain stage (after the reference series' ``load``) masks the reference series with the active
``brain_extraction`` model in a second thread, while the job's thread reads the model's other
series (their ``load`` time overlaps the brain stage, whose numpy and scipy steps run on one core
and leave the other to the DICOM decoding). Tumour labels
outside the mask are set to 0 and the job result records ``brain_volume_ml``. A study in which no
brain is found fails with the reason and sends nothing.

Each step is a plain function; :func:`run_job` times them, records the stage timings on the job,
and, in the same transaction that ends the job, queues a send of the SEG and the SR to every
destination. A study that lacks a modality the model needs ends ``skipped`` with the reason; any
other error of the job ends ``failed`` with a one-line reason. A database fault (a heartbeat or a
read that the database did not answer) is no fault of the study: it propagates out of :func:`run_job`,
the job stays ``running``, and the worker queues it again once the database answers
(node/service.py). Nothing the SCP acknowledged is touched.

After inference the ``qc`` stage (:func:`quality_check`, rules in node/qc.py) removes tumour outside
the brain mask and checks the result: a study that fails a rule writes its SEG and SR but sends
nothing and ends ``review`` (``segnode jobs retry ID --send-anyway`` sends them). When no tumour is
left, no SEG is written: the SR alone (0 mL) tells the PACS the study was analysed.

A run whose inputs (:func:`inputs_digest`: model, brain extractor, the chosen series' instances and
their files' versions) are those of the study's last run whose outputs were sent (a later part of the
study brought only a DWI or a key object) ends ``done`` and sends nothing again; a run that
``segnode jobs retry`` queued sends regardless.

A chosen series with fewer images than its headers announce (:func:`incomplete_series`) sends the job
back to the queue behind its study's idle timer (:func:`db.job_queue.defer_job`), for at most
``[node] incomplete_series_wait_seconds`` after the job was queued; then it runs on what came and says
so in its reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from traceback import format_exception
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from converters.exceptions import ConverterError
from converters.preprocess import Prepared
from converters.volume import Volume
from db import job_queue
from db.exceptions import DatabaseOperationError, DatabaseUnavailableError
from db.job_queue import OutputObject
from db.transactions import SessionFactory, utcnow
from node import qc
from node.announced_images import announced_images
from node.config import Destination, QCSettings, RegistrationConfig
from node.coregistration import Coregistered, LoadedSeries, coregister
from node.exceptions import InferenceError, JobError, NodeError, SelectionError
from node.log_scrub import scrub_text
from node.metrics import NodeMetrics
from node.runtime import LoadedExtractor, LoadedModel
from node.selection import (
    Assignment,
    SeriesInfo,
    SeriesSelector,
    differ,
    mixed_identity,
    role_texts,
    scan_grouped_series,
)
from node.spool import write_atomic

logger = logging.getLogger(__name__)

SOFTWARE_VERSION = "segnode 0.1.0"


class JobSupersededError(Exception):
    """The job this run claimed was claimed again (re-queued behind the run's back, its heartbeat
    stale): the run stops at its next heartbeat and ends nothing; the later run ends the job."""


@dataclass
class Assembled:
    """The selected series as volumes on one grid."""

    reference: Volume
    sources: list[Dataset]
    images: dict[str, npt.NDArray[np.float32]]
    affine: npt.NDArray[np.float64]
    #: The data sets (headers) of the other series the model gets, each series in slice order: the
    #: SR's evidence besides ``sources``, the reference's.
    others: list[Dataset] = field(default_factory=list)


@dataclass
class Timer:
    """Stage timings in seconds, in the order the stages ran."""

    stages: dict[str, float] = field(default_factory=dict)
    on_stage: Callable[[str, float], None] | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the body as stage ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            # A stage that runs again (the fallback model's load) adds to its time.
            self.stages[name] = round(self.stages.get(name, 0.0) + elapsed, 4)
            if self.on_stage:
                self.on_stage(name, elapsed)


def load_chosen(
    series: SeriesInfo, modality: str, read: Callable[[str], Dataset] | None = None
) -> LoadedSeries:
    """One chosen series as a volume, its RAS array and affine, and its datasets (raises JobError).

    ``read``: how a file becomes a data set (early analysis' read-ahead, node/read_ahead.py);
    ``pydicom.dcmread`` when None.
    """
    from converters.dicom_series import load_series
    from converters.reorient import share_ras_pixels, volume_to_ras

    reader = read or pydicom.dcmread
    datasets: list[Dataset] = [reader(str(p)) for p in series.paths]
    # Selection read a few headers of the series; all of them must be of one patient to make one volume.
    mixed = mixed_identity(datasets)
    if mixed:
        raise JobError(
            f"{modality} {series.label}: its instances carry more than one patient identity "
            f"({differ(mixed)} between them); refused"
        )
    try:
        volume = load_series(datasets)
    except ConverterError as exc:
        raise JobError(f"{modality} {series.label}: {exc}") from exc
    for ds in datasets:  # the volume holds the pixels; the SEG and SR need the headers only
        for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if keyword in ds:
                delattr(ds, keyword)
    array, affine = volume_to_ras(volume)
    # One copy of the voxels: the volume's array becomes a view of the RAS array (-34 MiB a 1 mm FLAIR).
    volume = share_ras_pixels(volume, array)
    return LoadedSeries(modality, series, volume, array, np.asarray(affine), datasets)


def assemble_coregistered(
    loaded: Mapping[str, LoadedSeries], reference: str, coregistered: Coregistered | None = None
) -> Assembled:
    """The study as the model sees it: the reference series' volume and sources, and every modality on
    its RAS grid (``coregistered``'s images; the reference alone when None)."""
    ref = loaded[reference]
    images = dict(coregistered.images) if coregistered is not None else {reference: ref.array}
    others = [ds for modality, series in loaded.items() if modality != reference for ds in _in_order(series)]
    return Assembled(
        reference=ref.volume, sources=_in_order(ref), images=images, affine=ref.affine, others=others
    )


def _in_order(series: LoadedSeries) -> list[Dataset]:
    """The data sets of ``series`` in slice order (a multi-frame image once)."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in series.datasets}
    return [by_uid[uid] for uid in dict.fromkeys(series.volume.sop_instance_uids)]


@dataclass
class Route:
    """A model that can run on the study: its task, the loaded model and the series it gets."""

    task: str
    model: LoadedModel
    assignment: Assignment


@dataclass
class RoutingPlan:
    """The models that can run, most capable first, and why the others cannot."""

    routes: list[Route] = field(default_factory=list)
    #: One entry per task of ``[routing] order``: task, model label, outcome, reason.
    considered: list[dict[str, Any]] = field(default_factory=list)
    #: Task and selection message of each task whose series are missing (the skip reason when nothing
    #: runs: :meth:`selection_failure`).
    selection_errors: list[tuple[str, str]] = field(default_factory=list)

    def selection_failure(self) -> str:
        """Why no model can run: each distinct selection message once, the least demanding model's
        first, and, where the models miss different series, each after the tasks it stops. A study
        without FLAIR said "no FLAIR series in the study (considered ...)" twice, naming no model."""
        ordered = list(reversed(self.selection_errors))
        messages = list(dict.fromkeys(message for _, message in ordered))
        if len(messages) == 1:
            return messages[0]
        tasks = {message: ", ".join(t for t, said in ordered if said == message) for message in messages}
        return "; ".join(f"{tasks[message]}: {message}" for message in messages)

    def note(
        self,
        task: str,
        model: LoadedModel | None,
        outcome: str,
        reason: str,
        registration: Mapping[str, Any] | None = None,
    ) -> None:
        """Record what became of ``task`` (``registration``: its series' figures when it failed there)."""
        entry: dict[str, Any] = {
            "task": task, "model": model.label if model else None, "outcome": outcome, "reason": reason
        }
        if registration is not None:
            entry["registration"] = dict(registration)
        for n, old in enumerate(self.considered):
            if old["task"] == task:
                self.considered[n] = entry
                return
        self.considered.append(entry)


def route(
    candidates: Sequence[tuple[str, LoadedModel | None]],
    series: Sequence[SeriesInfo],
    selector: SeriesSelector,
    registration: RegistrationConfig | None = None,
) -> RoutingPlan:
    """The models of ``candidates`` (task, active model; in ``[routing] order``) whose card's
    modalities are all in the study, from series of one patient: that of the series the model's
    reference modality (:func:`reference_modality` of ``registration``) takes
    (:meth:`SeriesSelector.assign`)."""
    plan = RoutingPlan()
    for task, model in candidates:
        if model is None:
            plan.note(task, None, "not run", f"no active {task} model")
            continue
        modalities = list(model.card["modalities"])
        reference = reference_modality(modalities, registration or RegistrationConfig())
        assignment = selector.assign(series, modalities, reference)
        if assignment.missing:
            plan.note(task, model, "not run", assignment.missing_reason())
            plan.selection_errors.append((task, assignment.missing_message(series)))
            continue
        plan.routes.append(Route(task, model, assignment))
        plan.note(task, model, "eligible", f"series present: {', '.join(modalities)}")
    return plan


def series_used(assignment: Assignment) -> str:
    """Which series served each input, for a reader: ``FLAIR: series UID (description, N slices) (over
    series ...: finer slices); T1: ... (why it is the native T1)`` (:func:`node.selection.role_texts`,
    :meth:`node.selection.Assignment.reasons`)."""
    labels = {m: s.label for m, s in assignment.chosen.items()}
    return "; ".join(f"{m}: {text}" for m, text in role_texts(labels, assignment.reasons()))


def routing_reason(plan: RoutingPlan, chosen: Route) -> str:
    """One line: which model ran and why (the tasks before it and what stopped them)."""
    before = []
    for entry in plan.considered:
        if entry["task"] == chosen.task:
            break
        before.append(f"{entry['task']}: {entry['reason']}")
    modalities = ", ".join(chosen.model.card["modalities"])
    ran = f"{chosen.task} ({chosen.model.label}) ran on {modalities}"
    return (
        f"{ran}; not {'; not '.join(before)}"
        if before
        else f"{ran}: the most capable model whose series are present"
    )


def reference_modality(modalities: Sequence[str], config: RegistrationConfig) -> str:
    """The series the others join: ``[registration] reference`` when the model has it, else its first."""
    return config.reference if config.reference in modalities else modalities[0]


def preprocess(
    model: LoadedModel, assembled: Assembled, brain_mask: npt.NDArray[np.bool_] | None = None
) -> Prepared:
    """The network slices of the assembled volumes, resampled from their geometry onto the model's grid.

    ``brain_mask``: optional boolean mask on the grid of ``assembled.images`` (RAS order); when
    given, the crop is centred on it and normalisation uses its voxels only.
    """
    return model.segmenter.prepare(assembled.images, assembled.affine, brain_mask)


def segment(
    model: LoadedModel,
    assembled: Assembled,
    prepared: Prepared | None = None,
    brain_mask: npt.NDArray[np.bool_] | None = None,
    blocks: tuple[int, int, int] = (1, 1, 1),
    shape: tuple[int, ...] | None = None,
) -> npt.NDArray[np.uint8]:
    """Run the model and map its label map back onto the reference series' (slice, row, column) grid.

    ``prepared``: the output of :func:`preprocess` (computed here, with ``brain_mask``, when None).
    ``blocks``, ``shape``: when ``assembled`` is on blocks of the reference's voxels
    (:func:`analysis_grid`), how many per block and the reference's RAS shape, to give the labels
    back on its own frames.
    """
    from converters.reorient import ras_to_volume
    from converters.resample import expand_blocks

    if prepared is None:
        prepared = preprocess(model, assembled, brain_mask)
    with model.lock:
        labels_xyz = np.asarray(model.segmenter.infer(prepared), dtype=np.uint8)
    if blocks != (1, 1, 1):
        if shape is None:
            raise ValueError(f"labels on blocks of {blocks} voxels need the reference's RAS shape")
        labels_xyz = expand_blocks(labels_xyz, blocks, shape)
    return np.asarray(ras_to_volume(labels_xyz, assembled.reference), dtype=np.uint8)


def analysis_grid(
    loaded: Mapping[str, LoadedSeries], reference: str, mask: npt.NDArray[np.bool_] | None
) -> tuple[dict[str, LoadedSeries], npt.NDArray[np.bool_] | None, tuple[int, int, int]]:
    """The series a model works on, the brain mask on their grid, and the voxels per block along each
    axis.

    As loaded, or, for a reference finer than about 2/3 mm (a 3D series reconstructed at 0.4-0.6 mm),
    the reference averaged over blocks of whole voxels about 1 mm wide
    (:func:`converters.resample.reduction_factors`, :func:`~converters.resample.block_mean`) and the
    mask on those blocks (a block is inside when most of its voxels are). The other series of a
    several-series model are resampled onto the reference's grid by the registration, and every class
    probability goes back onto it: on a 0.5 mm reference that was 62 M voxels per series and per
    class, 3 GiB and a minute for a four-series study, and 5 s of a one-series job's wait; the model
    itself works at 1 mm. The labels come back on the reference's frames (:func:`segment` with the
    blocks).
    """
    from converters.resample import block_mean, reduction_factors

    ref = loaded[reference]
    blocks = reduction_factors(ref.affine, ref.array.shape)
    if blocks == (1, 1, 1):
        return dict(loaded), mask, blocks
    array, affine = block_mean(ref.array, ref.affine, blocks)
    on_blocks = None if mask is None else block_mean(mask.view(np.uint8), ref.affine, blocks)[0] >= 0.5
    return {**loaded, reference: replace(ref, array=array, affine=affine)}, on_blocks, blocks


def source_frame_labels(labels: npt.NDArray[np.uint8], assembled: Assembled) -> npt.NDArray[np.uint8]:
    """The label planes in the order of the source frames, as the SEG's pixel array needs them.

    Single-frame sources are already in volume (slice) order. For one Enhanced MR (multi-frame)
    source, each frame's ImagePositionPatient (PS3.3 C.7.6.16.2.3) is projected on the slice
    direction to find its slice of the volume: the nearest one, within 0.45 of a slice (positions
    written rounded to 0.1 mm put a 0.5 mm stack's frames up to a quarter slice off, which the loader
    accepts), and each slice must get one frame.
    """
    if len(assembled.sources) != 1 or int(assembled.sources[0].get("NumberOfFrames", 1) or 1) == 1:
        return labels
    volume = assembled.reference
    order = []
    for n, frame in enumerate(assembled.sources[0].PerFrameFunctionalGroupsSequence, start=1):
        position = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        offset = float(np.dot(position - volume.origin, volume.slice_direction)) / volume.spacing[0]
        index = round(offset)
        if abs(offset - index) > 0.45 or not 0 <= index < labels.shape[0]:
            raise JobError(
                f"frame {n} of {assembled.sources[0].SOPInstanceUID} is not on a slice of the volume"
            )
        order.append(index)
    if len(set(order)) != len(order):
        raise JobError(f"frames of {assembled.sources[0].SOPInstanceUID} share a slice of the volume")
    return labels[np.asarray(order)]


@dataclass
class Brain:
    """The brain mask of the reference series, in RAS (X, Y, Z) order, and its volume."""

    mask: npt.NDArray[np.bool_]
    volume_ml: float
    extractor: str


def extract_brain(brain: LoadedExtractor, assembled: Assembled, modality: str) -> Brain:
    """The brain mask of the ``modality`` (the reference) series, on its grid.

    Raises
    ------
    converters.brain_mask.NoBrainFoundError
        No brain in the image: the job fails with that reason and nothing is sent.
    """
    from node.brain_extraction import brain_volume_ml

    image = assembled.images[modality]
    with brain.lock:
        mask = brain.extractor.extract(image, assembled.affine)
    return Brain(mask=mask, volume_ml=brain_volume_ml(mask, assembled.affine), extractor=brain.label)


def segment_volumes_ml(labels: npt.NDArray[np.uint8], card: Mapping[str, Any], volume: Volume) -> list[float]:
    """Volume in mL of each card label (segment order), from voxel counts and the source spacing."""
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    return [float((labels == int(label["value"])).sum()) * voxel_ml for label in card.get("labels") or []]


def region_volumes_ml(
    labels: npt.NDArray[np.uint8], card: Mapping[str, Any], volume: Volume
) -> dict[str, float]:
    """The composite regions of a ``brats_regions`` model, in mL: ``whole_tumour`` (every tissue) and
    ``tumour_core`` (non-enhancing/necrotic and enhancing: labels 2 and 3); empty for other tasks."""
    if card.get("task") != "brats_regions":
        return {}
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    return {
        "whole_tumour": float((labels > 0).sum()) * voxel_ml,
        "tumour_core": float(np.isin(labels, (2, 3)).sum()) * voxel_ml,
    }


def within_whole_tumour(
    labels: npt.NDArray[np.uint8], whole: npt.NDArray[np.bool_]
) -> npt.NDArray[np.uint8]:
    """A ``brats_regions`` label map (1 oedema, 2 non-enhancing/necrotic, 3 enhancing) made to fill
    ``whole`` (another model's whole tumour on the same grid) with its holes filled: its tumour core
    (2, 3) kept inside, every other voxel of it oedema, nothing outside it. A whole tumour has no
    holes; a necrotic core dark on FLAIR that a FLAIR model leaves out, enclosed by its oedema, stays."""
    from converters.masks import fill_holes

    inside = fill_holes(np.asarray(whole, dtype=bool))
    out = inside.astype(np.uint8)  # 1: oedema
    core = inside & np.isin(labels, (2, 3))
    out[core] = labels[core]
    return out


def brain_mask_for(assembled: Assembled, brain: Brain | None) -> npt.NDArray[np.bool_] | None:
    """The brain mask of the assembled study on its RAS grid (``assembled.images``' shape), or None
    when the brain stage did not run (no active ``brain_extraction`` model): the brain-mask rules of
    node/qc.py then report "not checked" and no tumour is removed."""
    return None if brain is None else brain.mask


@dataclass
class Checked:
    """The ``qc`` stage's output: the labels to send (tumour outside the brain removed) and the report."""

    labels: npt.NDArray[np.uint8]
    report: qc.QCReport


def quality_check(
    labels: npt.NDArray[np.uint8],
    assembled: Assembled,
    brain_ras: npt.NDArray[np.bool_] | None,
    slices: int,
    settings: QCSettings,
) -> Checked:
    """Remove tumour outside the brain and run the node/qc.py rules on the reference series' grid.

    Parameters
    ----------
    labels:
        The model's label map on the reference series' (slice, row, column) grid.
    assembled:
        The assembled study (its reference volume gives the grid, the spacing and the head mask).
    brain_ras:
        The brain mask on the RAS grid of ``assembled.images``, or None.
    slices:
        The slice count of the series (the fewest among the chosen series).
    settings:
        The ``[qc]`` limits.
    """
    from converters.reorient import ras_to_volume

    reference = assembled.reference
    brain = None
    if brain_ras is not None:
        brain = np.asarray(ras_to_volume(np.asarray(brain_ras, dtype=bool), reference), dtype=bool)
    kept, removed = qc.restrict_to_brain(labels, brain)
    voxel_ml = float(np.prod(reference.spacing)) / 1000.0
    # With a brain mask the head rules add nothing (node/qc.py), and the head costs ~1 s per study.
    head = qc.head_mask(reference.array) if brain is None else None
    report = qc.check(
        kept, brain, voxel_ml, slices, settings,
        head=head, removed_voxels=removed, spacing_mm=reference.spacing,
        slice_direction=[float(v) for v in reference.slice_direction],
    )  # fmt: skip
    return Checked(labels=np.asarray(kept, dtype=np.uint8), report=report)


@dataclass
class JobContext:
    """What a worker needs to run jobs."""

    sf: SessionFactory
    selector: SeriesSelector
    jobs_dir: Path
    destinations: list[Destination]
    metrics: NodeMetrics
    #: The active model of each task of ``[routing] order``, in that order (None: no usable model).
    models: Callable[[], list[tuple[str, LoadedModel | None]]]
    qc: QCSettings = field(default_factory=QCSettings)
    #: The active brain extractor; when it returns None (no brain_extraction model active), the
    #: brain stage is skipped and ``brain_volume_ml`` is null in the result.
    brain: Callable[[], LoadedExtractor | None] = lambda: None
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    #: Hands a job what early analysis computed for its study (node/early.py), waiting for a run
    #: still in progress; None when early analysis is off.
    early: Callable[[str], EarlyWork | None] | None = None
    #: Called when a job has queued outputs for sending (the sender wakes rather than waiting for its
    #: next poll); None: the sender finds them at its next poll.
    outputs_queued: Callable[[], None] | None = None
    #: Reads a spool file into a data set, taking what early analysis read ahead (node/read_ahead.py);
    #: None: ``pydicom.dcmread``.
    read: Callable[[str], Dataset] | None = None
    #: ``[node] incomplete_series_wait_seconds``: how long after its job was queued a study whose chosen
    #: series has fewer images than its headers announce waits for the rest (:func:`incomplete_series`).
    incomplete_series_wait: float = 120.0


@dataclass
class Segmented:
    """What the chosen model made of the study, before the outputs are written."""

    route: Route
    assembled: Assembled
    brain: Brain | None
    labels: npt.NDArray[np.uint8]
    report: qc.QCReport
    coregistered: Coregistered | None
    #: The SEG of ``labels`` as a DICOM file, when early analysis built it already (:func:`encode_seg`):
    #: the job, once the study is complete, only writes it. None: not built, or no tumour. Bytes, not
    #: the highdicom object, which keeps an SQLite frame index usable only in the thread that built it.
    seg_file: bytes | None = None
    #: Where the whole tumour's extent came from when not from the model that ran alone
    #: (:func:`take_whole_tumour_extent`), one line for the routing; None: the model's own labels.
    extent: str | None = None
    #: The model's own result when its whole tumour was taken from another model's
    #: (:func:`take_whole_tumour_extent`); a later check starts again from it.
    model_result: Segmented | None = None
    #: Label value -> the SEG's Segment Description of that label's segment (where its extent came from).
    segment_notes: dict[int, str] | None = None


def encode_seg(done: Segmented, run: int = 1, *, resend: int = 0, qc_failed: bool = False) -> bytes:
    """The SEG of ``done``'s labels (which hold a tumour) on its reference series' frames, as a file
    (``run``: which analysis of the study, ``resend``: how many earlier results of the run were queued
    for sending, ``qc_failed``: the result failed a QC check; :func:`node.seg.run_series`)."""
    from node.seg import build_seg

    frame_labels = source_frame_labels(done.labels, done.assembled)
    card = done.route.model.card
    seg = build_seg(
        done.assembled.sources, frame_labels, card, software_version=SOFTWARE_VERSION, run=run,
        resend=resend, qc_failed=qc_failed, notes=done.segment_notes,
    )  # fmt: skip
    return encoded(seg)


def _series_files(info: SeriesInfo) -> tuple[str, tuple[tuple[str, int, int], ...]]:
    """A series' identity for reuse: its UID and its spool files, in any order, each with its version
    when the series was scanned (``SeriesInfo.versions``): an instance sent again with other content
    replaces its file under the same path, and work done on the former file is not the new one's."""
    versions = info.versions if len(info.versions) == len(info.paths) else [(-1, -1)] * len(info.paths)
    return info.series_instance_uid, tuple(
        sorted((str(path), *version) for path, version in zip(info.paths, versions, strict=True))
    )


def same_files(a: SeriesInfo, b: SeriesInfo) -> bool:
    """True when ``a`` and ``b`` are the same series made of the same spool files."""
    return _series_files(a) == _series_files(b)


def route_key(chosen: Route, extractor: str | None) -> tuple[Any, ...]:
    """What a model's result on a study depends on: the model, the brain extractor and the files of
    each series it gets (the node's settings are fixed for the life of the process)."""
    files = tuple((m, _series_files(info)) for m, info in sorted(chosen.assignment.chosen.items()))
    return (chosen.task, chosen.model.label, extractor, files)


def inputs_digest(chosen: Route, extractor: str | None, settings: Mapping[str, Any]) -> str:
    """A digest of what a run's result depends on: this software's version and :func:`route_key` (the
    model, the brain extractor, and each chosen series' UID with its instances' spool files, named after
    their SOP Instance UIDs, and the files' versions: an instance sent again with other content is
    another version), and ``settings``: the node's settings that change a result
    (:func:`result_settings`: QC rules, registration, test-time mirroring and views; a restart with others is
    another result). Two runs with the
    same digest make the same SEG and SR (:func:`run_job`)."""
    key = json.dumps(
        [SOFTWARE_VERSION, route_key(chosen, extractor), settings], separators=(",", ":"), default=str
    )
    return hashlib.sha256(key.encode()).hexdigest()


def result_settings(ctx: JobContext, chosen: Route) -> dict[str, Any]:
    """The settings a result depends on besides its inputs (:func:`inputs_digest`)."""
    settings: dict[str, Any] = {
        "qc": asdict(ctx.qc),
        "registration": asdict(ctx.registration),
        "mirror": chosen.model.segmenter.mirror,
    }
    views = getattr(chosen.model.segmenter, "views", 1)
    if views != 1:  # absent at 1, so that the digests of results made before the setting existed hold
        settings["views"] = views
    if len(chosen.model.card["modalities"]) > 1:  # its QC compares with the whole_tumor model's result
        settings["compared_with"] = [m.label for t, m in ctx.models() if t == WHOLE_TUMOUR_TASK and m]
    return settings


def _not_again(ctx: JobContext, job_id: int, digest: str) -> tuple[str, list[Destination]] | None:
    """When the study's last run whose outputs were queued for sending had the inputs of ``digest``:
    the reason this run sends nothing again, and the destinations that run's outputs never went to
    (a destination added since, or one that refused them for good), which this run's go to; None when
    the inputs changed (or no earlier run sent anything)."""
    sent = job_queue.last_sent_run(ctx.sf, job_id)
    if sent is None or sent.result.get("inputs_digest") != digest:
        return None
    # By name, as the sender delivers (node/sender.py ``Sender._address``): a destination whose address
    # was corrected in the config since is the one those sends went to.
    reached = {name for name, *_ in sent.destinations}
    rest = [d for d in ctx.destinations if d.name not in reached]
    reason = f"inputs unchanged since job {sent.job_id}; results not sent again"
    if rest:
        names = ", ".join(d.name for d in rest)
        reason += f" (sent only to {names}, which job {sent.job_id}'s did not reach)"
    return reason, rest


@dataclass
class EarlyWork:
    """What early analysis (node/early.py) computed for a study before its job: series read, brain
    masks and the result of the most capable model its settled series allowed."""

    loaded: dict[str, LoadedSeries] = field(default_factory=dict)
    brains: dict[str, Brain | None] = field(default_factory=dict)
    segmented: dict[tuple[Any, ...], Segmented] = field(default_factory=dict)
    #: Whole-tumour labels (and their series' volume) computed only for the ``whole_tumour_agreement``
    #: check of a several-series result, by :func:`route_key`: the job's check reuses them.
    checks: dict[tuple[Any, ...], tuple[npt.NDArray[np.uint8], Volume]] = field(default_factory=dict)
    #: Stage timings of the early runs, summed.
    stages: dict[str, float] = field(default_factory=dict)


class _Study:
    """The series and brain masks of one job, loaded once whichever models it tries.

    ``job_id`` None: early analysis, with no job row to heartbeat. ``attempt``: the job's claim
    (:class:`db.job_queue.Claim`). ``early``: what early analysis already computed for the study;
    each piece is used only for the very same files.
    """

    def __init__(
        self,
        ctx: JobContext,
        job_id: int | None,
        timer: Timer,
        early: EarlyWork | None = None,
        attempt: int | None = None,
    ) -> None:
        self.ctx, self.job_id, self.timer, self.attempt = ctx, job_id, timer, attempt
        self.loaded: dict[str, LoadedSeries] = {}
        self.brains: dict[str, Brain | None] = {}
        self.early = early
        #: The error of each series (by its files) that could not be read, not to read it twice.
        self.unreadable: dict[tuple[str, tuple[tuple[str, int, int], ...]], JobError] = {}
        #: What came from early analysis: "load MODALITY", "brain MODALITY", "result TASK", "seg TASK"
        #: (the result's SEG, built early too) and "whole-tumour check TASK" (the result compared with).
        self.reused: list[str] = []
        #: Results this run computed before, by :func:`route_key` (early analysis: those of its earlier
        #: runs on the study), for the ``whole_tumour_agreement`` check.
        self.results: dict[tuple[Any, ...], Segmented] = {}
        #: Whole-tumour labels computed for that check alone (:attr:`EarlyWork.checks`).
        self.checks: dict[tuple[Any, ...], tuple[npt.NDArray[np.uint8], Volume]] = {}

    def heartbeat(self) -> None:
        """Tell the queue the job is alive (nothing for early analysis); raises JobSupersededError when
        the job was claimed again meanwhile."""
        if self.job_id is not None:
            _heartbeat(self.ctx, self.job_id, self.attempt)

    def _from_early(self, modality: str, info: SeriesInfo) -> LoadedSeries | None:
        done = self.early.loaded.get(modality) if self.early else None
        if done is None or not same_files(done.info, info):
            return None
        self.reused.append(f"load {modality}")
        return done

    def load(self, assignment: Assignment, only: Sequence[str] | None = None) -> dict[str, LoadedSeries]:
        """The series of ``assignment`` (those of ``only`` when given), read once per job.

        A chosen series that cannot be read is replaced by the modality's next candidate that can
        (``assignment.alternatives``, best first; one that another modality has is skipped), with a
        line in ``assignment.replaced``; when none can, the first series' error is raised (JobError).
        """
        modalities = [m for m in assignment.chosen if only is None or m in only]
        with self.timer.stage("load"):
            for modality in modalities:
                self._load_role(assignment, modality)
        self.heartbeat()
        return {m: self.loaded[m] for m in modalities}

    def _load_one(self, modality: str, info: SeriesInfo) -> LoadedSeries:
        """``info`` read as ``modality`` (from this job's reads, early analysis' or the spool)."""
        cached = self.loaded.get(modality)
        if cached is not None and same_files(cached.info, info):
            return cached
        if (known := self.unreadable.get(_series_files(info))) is not None:
            raise known
        early = self._from_early(modality, info)
        try:
            loaded = early if early is not None else load_chosen(info, modality, self.ctx.read)
        except JobError as exc:
            self.unreadable[_series_files(info)] = exc
            raise
        self.loaded[modality] = loaded
        self.brains.pop(modality, None)  # a mask of other files is no mask of these
        return loaded

    def _load_role(self, assignment: Assignment, modality: str) -> None:
        first = assignment.chosen[modality]
        try:
            self._load_one(modality, first)
            return
        except JobError as exc:
            error = exc
        others = {i.series_instance_uid for m, i in assignment.chosen.items() if m != modality}
        for alternative in assignment.alternatives.get(modality, []):
            if alternative.series_instance_uid in others:
                continue
            try:
                self._load_one(modality, alternative)
            except JobError:
                continue
            line = f"{modality} {first.label} could not be read ({error}); {alternative.label} used instead"
            logger.warning("%s", line)
            assignment.chosen[modality] = alternative
            assignment.preferred.pop(modality, None)  # the line says why this one
            assignment.replaced.append(line)
            return
        raise error

    def load_and_mask(
        self, assignment: Assignment, reference: str
    ) -> tuple[dict[str, LoadedSeries], Brain | None]:
        """Every series of ``assignment`` and the reference's brain mask: the reference is read first,
        then the others while the brain network runs on it in a second thread."""
        first = self.load(assignment, [reference])
        assembled = assemble_coregistered(first, reference)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="brain") as pool:
            masking = pool.submit(self.brain, reference, assembled)
            loaded = self.load(assignment)  # waits for the brain thread if a series cannot be read
            return loaded, masking.result()

    def _brain_from_early(self, reference: str, extractor: LoadedExtractor) -> Brain | None:
        """Early analysis' mask of the reference, when it is of the series read (the early read
        itself) by the same extractor."""
        if self.early is None or self.early.loaded.get(reference) is not self.loaded.get(reference):
            return None
        done = self.early.brains.get(reference)
        if done is None or done.extractor != extractor.label:
            return None
        self.reused.append(f"brain {reference}")
        return done

    def brain(self, reference: str, assembled: Assembled) -> Brain | None:
        if reference not in self.brains:
            extractor = self.ctx.brain()
            if extractor is None:
                if self.job_id is not None:
                    logger.warning(
                        "job %d: no active brain_extraction model; the brain stage is skipped", self.job_id
                    )
                self.brains[reference] = None
            elif (early := self._brain_from_early(reference, extractor)) is not None:
                self.brains[reference] = early
            else:
                with self.timer.stage("brain"):
                    self.brains[reference] = extract_brain(extractor, assembled, reference)
                self.heartbeat()
        return self.brains[reference]

    def early_result(self, chosen: Route) -> Segmented | None:
        """Early analysis' result of ``chosen``'s model on the very same files, if there is one."""
        if self.early is None:
            return None
        done = self.early.segmented.get(self._key(chosen))
        if done is None:
            return None
        self.reused.append(f"result {chosen.task}")
        return replace(done, route=chosen)

    def _key(self, chosen: Route) -> tuple[Any, ...]:
        """:func:`route_key` of ``chosen`` with the node's brain extractor."""
        extractor = self.ctx.brain()
        return route_key(chosen, extractor.label if extractor else None)

    def known_result(self, chosen: Route) -> Segmented | None:
        """A result of ``chosen``'s model on the very same files that this run or early analysis
        computed already, if there is one."""
        key = self._key(chosen)
        done = self.results.get(key)
        if done is None and self.early is not None and (done := self.early.segmented.get(key)) is not None:
            self.reused.append(f"whole-tumour check {chosen.task}")
        return done

    def known_check(self, chosen: Route) -> tuple[npt.NDArray[np.uint8], Volume] | None:
        """Labels of ``chosen``'s model computed for the whole-tumour check alone, by this run or early
        analysis, on the very same files, if there are some."""
        key = self._key(chosen)
        found = self.checks.get(key)
        if found is None and self.early is not None and (found := self.early.checks.get(key)) is not None:
            self.reused.append(f"whole-tumour check {chosen.task}")
        return found

    def keep_check(self, chosen: Route, found: tuple[npt.NDArray[np.uint8], Volume]) -> None:
        """Keep labels computed for the whole-tumour check (:meth:`known_check`)."""
        self.checks[self._key(chosen)] = found


def _try_route(study: _Study, chosen: Route, plan: RoutingPlan) -> Segmented | None:
    """Run ``chosen``'s model on the study; None when its registration failed (noted in ``plan``)."""
    ctx, timer = study.ctx, study.timer
    model, card = chosen.model, chosen.model.card
    early = study.early_result(chosen)
    if early is not None:
        plan.note(chosen.task, model, "ran", routing_reason(plan, chosen))
        return early
    modalities = list(card["modalities"])
    reference = reference_modality(modalities, ctx.registration)
    loaded, brain = study.load_and_mask(chosen.assignment, reference)
    assembled = assemble_coregistered(loaded, reference)
    mask = brain_mask_for(assembled, brain)
    coregistered = None
    grid, model_mask, blocks = analysis_grid(loaded, reference, mask)
    model_view = assembled if blocks == (1, 1, 1) else assemble_coregistered(grid, reference)
    if len(modalities) > 1:
        with timer.stage("register"):
            coregistered = coregister(grid, reference, modalities, model_mask, ctx.registration)
        study.heartbeat()
        if coregistered.failures:
            plan.note(
                chosen.task, model, "not run", "; ".join(coregistered.failures), coregistered.as_dict()
            )
            return None
        model_view = assemble_coregistered(grid, reference, coregistered)
    try:
        with timer.stage("preprocess"):  # in world space; z-scored inside the brain when there is a mask
            prepared = preprocess(model, model_view, model_mask)
        with timer.stage("inference"):
            labels = segment(model, model_view, prepared, blocks=blocks, shape=loaded[reference].array.shape)
    except (RuntimeError, ValueError, ConverterError) as exc:  # OpenVINO's, numpy's, the card's...
        raise InferenceError(f"model {model.label} failed on the study: {type(exc).__name__}: {exc}") from exc
    ctx.metrics.inference_seconds.observe(timer.stages["inference"])  # in a job or early analysis
    study.heartbeat()
    with timer.stage("qc"):
        slices = min(s.slices for s in chosen.assignment.chosen.values())
        checked = quality_check(labels, assembled, mask, slices, ctx.qc)  # tumour outside the brain goes
    plan.note(chosen.task, model, "ran", routing_reason(plan, chosen))
    return Segmented(chosen, assembled, brain, checked.labels, checked.report, coregistered)


def segment_study(study: _Study, plan: RoutingPlan) -> Segmented:
    """The most capable model of ``plan`` whose registration passes and that runs on the study; raises
    JobError when none can run."""
    for n, chosen in enumerate(plan.routes):
        try:
            done = _try_route(study, chosen, plan)
        except JobError as exc:  # a series that cannot be read counts as absent when a model needs less;
            if n == len(plan.routes) - 1:  # a model failing on the study (InferenceError) too
                raise
            if isinstance(exc, InferenceError):
                logger.warning("%s; trying the next model", scrub_text(str(exc)))
            plan.note(chosen.task, chosen.model, "not run", str(exc))
            continue
        if done is not None:
            return compare_whole_tumour(study, plan, done)
    failed = "; ".join(f"{e['task']}: {e['reason']}" for e in plan.considered if e["outcome"] == "not run")
    raise JobError(f"no model could run on the study ({failed})")


#: The task whose model a several-series model's whole tumour is compared with (node/qc.py
#: ``whole_tumour_agreement``).
WHOLE_TUMOUR_TASK = "whole_tumor"


def _whole_tumour_of(study: _Study, chosen: Route) -> tuple[npt.NDArray[np.uint8], Volume]:
    """The labels of ``chosen`` (a one-series model) on its reference series' grid, tumour outside the
    brain removed, and that series' volume: run on the series and brain mask the study holds already
    (read and masked for the model that ran), timed as stage ``whole-tumour check``."""
    from converters.reorient import ras_to_volume

    model = chosen.model
    reference = reference_modality(list(model.card["modalities"]), study.ctx.registration)
    loaded, brain = study.load_and_mask(chosen.assignment, reference)
    with study.timer.stage("whole-tumour check"):
        assembled = assemble_coregistered(loaded, reference)
        mask = brain_mask_for(assembled, brain)
        grid, model_mask, blocks = analysis_grid(loaded, reference, mask)
        model_view = assembled if blocks == (1, 1, 1) else assemble_coregistered(grid, reference)
        try:
            prepared = preprocess(model, model_view, model_mask)
            labels = segment(model, model_view, prepared, blocks=blocks, shape=loaded[reference].array.shape)
        except (RuntimeError, ValueError, ConverterError) as exc:
            reason = f"model {model.label} failed on the study: {type(exc).__name__}: {exc}"
            raise InferenceError(reason) from exc
        if mask is not None:
            on_grid = np.asarray(ras_to_volume(np.asarray(mask, dtype=bool), assembled.reference), dtype=bool)
            return np.asarray(qc.restrict_to_brain(labels, on_grid)[0], dtype=np.uint8), assembled.reference
    return labels, assembled.reference


def compare_whole_tumour(study: _Study, plan: RoutingPlan, done: Segmented) -> Segmented:
    """``done`` with the ``whole_tumour_agreement`` rule (node/qc.py) in its report: when a several-series
    model ran, its whole tumour against the ``whole_tumor`` model's on the same study (the result early
    analysis or this run computed on the same files, else that model run here on the reference series
    already read and masked: the FLAIR model's preprocess and inference, about a third of the regions
    model's); ``not checked`` otherwise, saying why. With ``[qc] whole_tumour_from_flair_model`` the
    result then takes its whole tumour from that model (:func:`take_whole_tumour_extent`)."""
    settings = study.ctx.qc
    prior = done
    if done.model_result is not None:  # early analysis took the whole tumour already: again, from the model's
        done = done.model_result
    labels = done.labels
    tumour_ml = float(np.count_nonzero(labels)) * float(np.prod(done.assembled.reference.spacing)) / 1000.0

    def without(why: str) -> Segmented:
        rule = qc.rule_whole_tumour_agreement(tumour_ml, None, None, settings, why)
        figures: dict[str, float | int | None] = {"whole_tumour_model_ml": None, "whole_tumour_dice": None}
        return replace(done, report=qc.with_rule(done.report, rule, figures))

    if len(done.route.model.card["modalities"]) < 2:
        return without("a one-series model ran: nothing to compare with")
    off = "off ([qc] compare_whole_tumour = false)"
    if not settings.compare_whole_tumour and not settings.whole_tumour_from_flair_model:
        return without(off)
    whole = next((r for r in plan.routes if r.task == WHOLE_TUMOUR_TASK), None)
    if whole is None:
        entry = next((e for e in plan.considered if e["task"] == WHOLE_TUMOUR_TASK), None)
        why = entry["reason"] if entry else f"{WHOLE_TUMOUR_TASK} is not in [routing] order"
        return without(f"no {WHOLE_TUMOUR_TASK} model to compare with ({why})")
    if len(whole.model.card["modalities"]) > 1:
        return without(f"the {WHOLE_TUMOUR_TASK} model {whole.model.label} needs several series too")
    known = study.known_result(whole)
    try:
        if known is not None:
            other, volume = known.labels, known.assembled.reference
        elif (checked := study.known_check(whole)) is not None:
            other, volume = checked
        else:
            other, volume = _whole_tumour_of(study, whole)
            study.keep_check(whole, (other, volume))
    except (JobError, ConverterError, OSError) as exc:
        # Its series unreadable, its brain not found (a FLAIR masked here for the first time when the
        # reference is another series), or the model failing on it: no comparison, the result stands.
        logger.warning("%s; the whole-tumour check is not made", scrub_text(str(exc)))
        return without(f"the {WHOLE_TUMOUR_TASK} model {whole.model.label} could not run: {exc}")
    reference_ml = float(np.count_nonzero(other)) * float(np.prod(volume.spacing)) / 1000.0
    ref = reference_modality(list(done.route.model.card["modalities"]), study.ctx.registration)
    flair = reference_modality(list(whole.model.card["modalities"]), study.ctx.registration)
    mine, theirs = done.route.assignment.chosen.get(ref), whole.assignment.chosen.get(flair)
    one_grid = (
        mine is not None and theirs is not None and same_files(mine, theirs) and other.shape == labels.shape
    )
    overlap = qc.dice(labels > 0, other > 0) if one_grid else None
    if settings.compare_whole_tumour:
        rule = qc.rule_whole_tumour_agreement(tumour_ml, reference_ml, overlap, settings)
    else:  # computed only to take the whole tumour from it
        rule = qc.rule_whole_tumour_agreement(tumour_ml, None, None, settings, off)
    figures: dict[str, float | int | None] = {
        "whole_tumour_model_ml": round(reference_ml, 3),
        "whole_tumour_dice": None if overlap is None else round(overlap, 3),
    }
    checked_done = replace(done, report=qc.with_rule(done.report, rule, figures))
    if not settings.whole_tumour_from_flair_model:
        return checked_done
    if not one_grid:
        note = (
            f"whole tumour the model's own: the {WHOLE_TUMOUR_TASK} model ran on another series than its "
            f"reference ({ref})"
        )
        return replace(checked_done, extent=note)
    taken = take_whole_tumour_extent(study, checked_done, other > 0, whole)
    if prior is not done and prior.seg_file is not None and np.array_equal(prior.labels, taken.labels):
        taken = replace(taken, seg_file=prior.seg_file)  # the SEG early analysis built of the same labels
    return taken


def take_whole_tumour_extent(
    study: _Study, done: Segmented, whole: npt.NDArray[np.bool_], source: Route
) -> Segmented:
    """``done`` (a several-series result) with its whole tumour taken from ``whole``, the ``source``
    model's on the same grid (:func:`within_whole_tumour`): the QC rules run again on the labels it
    will send, the ``whole_tumour_agreement`` rule (which judged the model's own tumour) kept, the
    model's own volume kept as the figure ``model_tumour_volume_ml``, and a SEG early analysis built
    from the model's own labels dropped."""
    with study.timer.stage("whole-tumour extent"):
        labels = within_whole_tumour(done.labels, whole)
        slices = min(s.slices for s in done.route.assignment.chosen.values())
        brain = brain_mask_for(done.assembled, done.brain)
        checked = quality_check(labels, done.assembled, brain, slices, study.ctx.qc)
    own_ml = done.report.figures.get("tumour_volume_ml")
    figures: dict[str, float | int | None] = {
        "model_tumour_volume_ml": own_ml,
        "whole_tumour_model_ml": done.report.figures.get("whole_tumour_model_ml"),
        "whole_tumour_dice": done.report.figures.get("whole_tumour_dice"),
    }
    report = qc.with_rule(checked.report, done.report.by_name("whole_tumour_agreement"), figures)
    own = "" if own_ml is None else f" ({own_ml:.1f} mL the model's own whole tumour)"
    note = (
        f"whole tumour from {source.task} ({source.model.label}) on the same FLAIR; tumour core from "
        f"{done.route.task} inside it, the rest oedema{own}"
    )
    # The oedema segment (label 1) is the other model's whole tumour less this model's core: its SEG says so.
    card = source.model.card
    oedema = {1: f"whole tumour of {card.get('name', source.task)} {card.get('version', '')} less the core"}
    return replace(
        done, labels=checked.labels, report=report, seg_file=None, extent=note, model_result=done,
        segment_notes=oedema,
    )  # fmt: skip


def spooled_files(groups: Mapping[str, Sequence[str]]) -> tuple[dict[str, list[Path]], list[str]]:
    """``groups`` (series UID -> spool paths of its instances' rows) without the instances whose spool
    file is not there, and the SOP Instance UIDs of those (a spool file is named after its instance,
    node/spool.py); a series left with no file is left out, as if it had never come.

    The receiver commits an instance's row while its file is still being written (in parallel, for
    speed); a crash in between leaves a row whose file never existed. The PACS got no answer and
    usually sends the instance again (node/scp.py writes the file then); until it does, the study is
    analysed without it rather than failing as a whole on the missing file.
    """
    present: dict[str, list[Path]] = {}
    missing: list[str] = []
    for series, paths in groups.items():
        found = []
        for raw in paths:
            path = Path(raw)
            if path.is_file():
                found.append(path)
            else:
                missing.append(path.stem)
        if found:
            present[series] = found
    return present, missing


#: How many SOP Instance UIDs a log line names before "and N more" (the job's result keeps them all).
LOGGED_UIDS = 10


def _first_uids(uids: Sequence[str]) -> str:
    """The first :data:`LOGGED_UIDS` of ``uids``, and how many more there are."""
    shown = ", ".join(uids[:LOGGED_UIDS])
    return shown if len(uids) <= LOGGED_UIDS else f"{shown} and {len(uids) - LOGGED_UIDS} more"


def analyse_early(ctx: JobContext, groups: Mapping[str, Sequence[str]], work: EarlyWork) -> None:
    """Early analysis of a study's settled series (``groups``: series UID -> spool paths): route them
    as a job would and run the most capable model they allow, keeping reads, masks and the result in
    ``work`` (node/early.py). Nothing is written; errors propagate (the job meets and reports them)."""
    timer = Timer()
    try:
        with timer.stage("select"):
            # The job reports files missing.
            series = scan_grouped_series(spooled_files(groups)[0], ctx.qc.min_slices)
            plan = route(ctx.models(), series, ctx.selector, ctx.registration)
        if not plan.routes:
            return
        extractor = ctx.brain()
        label = extractor.label if extractor is not None else None
        if route_key(plan.routes[0], label) in work.segmented:
            return
        study = _Study(ctx, None, timer)
        study.loaded, study.brains = work.loaded, work.brains  # what earlier runs read and masked
        study.results = work.segmented  # a whole_tumor result of an earlier run serves its check
        study.checks = work.checks  # and what this run computes for the check, the job's
        done = segment_study(study, plan)
        # The SEG too: when receiving, not this run, ends last, the job then only writes it.
        if done.labels.any():
            with timer.stage("seg"):
                done.seg_file = encode_seg(done)
        work.segmented[route_key(done.route, label)] = done
    finally:
        for name, seconds in timer.stages.items():
            work.stages[name] = round(work.stages.get(name, 0.0) + seconds, 4)


def _announced_images(path: Path) -> int | None:
    """How many images the header of ``path`` says its series has at least (ImagesInAcquisition, or
    a vendor's slice count: :func:`node.announced_images.announced_images`); None when it says nothing
    usable, and for a multi-frame image, whose frames arrive whole in one object."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    try:
        if int(ds.get("NumberOfFrames") or 1) > 1:
            return None
    except (TypeError, ValueError):
        return None
    found = announced_images(ds)
    return found[0] if found else None


def incomplete_series(plan: RoutingPlan, groups: Mapping[str, Sequence[Path]]) -> list[str]:
    """``series UID: N of M images received`` for each series a model of ``plan`` would read whose
    headers announce more images (ImagesInAcquisition, or a vendor's slice count) than the study holds
    (``groups``: series UID -> its instances' files, every echo of the series counted): the PACS paused
    within the series for longer than ``study_idle_seconds``. Headers that disagree (the first and the
    last received) say nothing; so do a multi-frame image and a series whose headers announce
    nothing."""
    found: list[str] = []
    chosen = {s.series_instance_uid for r in plan.routes for s in r.assignment.chosen.values()}
    for uid in sorted(chosen):
        paths = groups.get(uid) or []
        if not paths or (announced := _announced_images(paths[0])) is None or len(paths) >= announced:
            continue
        if _announced_images(paths[-1]) != announced:
            continue
        found.append(f"series {uid}: {len(paths)} of {announced} images received")
    return found


def _heartbeat(ctx: JobContext, job_id: int, attempt: int | None) -> None:
    if not job_queue.heartbeat(ctx.sf, job_id, attempt=attempt):
        raise JobSupersededError(f"job {job_id} was claimed again while this run (attempt {attempt}) ran")


def run_job(ctx: JobContext, job_id: int, attempt: int | None = None) -> str:
    """Run claimed job ``job_id`` to its end state; returns that state (done, skipped, failed, review).

    ``attempt``: the claim's attempt number (:class:`db.job_queue.Claim`; None: the job's current
    one). The run heartbeats and ends the job only at that claim: once the job was claimed again (its
    heartbeat went stale and it was re-queued), the run stops at its next heartbeat, or its end is
    refused, and returns ``superseded``, ending nothing; the later run's result stands.

    A database fault (:class:`~db.exceptions.DatabaseUnavailableError`,
    :class:`~db.exceptions.DatabaseOperationError`) propagates and leaves the job running: the caller
    queues it again (:func:`db.job_queue.requeue_interrupted`) once the database answers.

    Routing: the models of ``[routing] order`` are tried most capable first; a model runs when every
    series its card asks for is in the study and, for several series, each one's registration onto the
    reference passed its check. The result's ``routing`` says which model ran and why.
    """
    from node.preview import render_preview
    from node.sr import build_sr

    timer = Timer(on_stage=lambda name, sec: ctx.metrics.stage_seconds.labels(name).observe(sec))
    candidates = ctx.models()
    info = job_queue.get_job(ctx.sf, job_id)
    attempt = info.attempts if attempt is None else attempt
    # One folder per attempt: a retried job never overwrites a file a pending send still points at.
    out_dir = ctx.jobs_dir / str(job_id) / f"attempt-{attempt}"
    if not any(model is not None for _, model in candidates):
        reason = "no usable model for the node's tasks (see segnode models list)"
        return _end(ctx, job_id, attempt, "failed", reason, timer)
    model: LoadedModel | None = None
    missing: list[str] = []  # SOP Instance UIDs of the job's instances whose spool file is not there
    incomplete = ""  # the chosen series with fewer images than announced, when the wait ran out
    try:
        with timer.stage("select"):
            groups, missing = spooled_files(job_queue.job_series_paths(ctx.sf, job_id))
            if missing:
                logger.warning(
                    "job %d: %d instance(s) recorded without their spool file (the node stopped while "
                    "writing them, and the PACS has not sent them again) are left out: %s",
                    job_id, len(missing), _first_uids(missing),
                )  # fmt: skip
            if not groups:
                raise JobError("the study has no kept MR instances in the spool")
            series = scan_grouped_series(groups, ctx.qc.min_slices)
            plan = route(candidates, series, ctx.selector, ctx.registration)
            short = incomplete_series(plan, groups)
        if short:
            waited = (utcnow() - info.created_at).total_seconds()
            if waited < ctx.incomplete_series_wait and job_queue.RETRY_REQUESTED not in info.result:
                # Back to the queue behind the study's idle timer: the rest of the series may be on its
                # way in an association the PACS opens later. A retry does not wait.
                reason = f"waiting for the rest of a series ({'; '.join(short)})"
                if not job_queue.defer_job(ctx.sf, job_id, attempt=attempt, reason=reason):
                    return "superseded"
                log = logger.debug if info.reason == reason else logger.info
                log("job %d: %s; waits up to %.0f s", job_id, reason, ctx.incomplete_series_wait)
                return "waiting"
            incomplete = f"{'; '.join(short)} (analysed after waiting {waited:.0f} s)"
            logger.warning("job %d: %s", job_id, incomplete)
        if not plan.routes:
            # The least demanding model's missing series first: what a reader needs to know.
            raise SelectionError(plan.selection_failure())
        _heartbeat(ctx, job_id, attempt)
        early = None
        if ctx.early is not None:
            with timer.stage("early analysis (wait)"):  # ~0 unless a run on this study is under way
                early = ctx.early(info.study_instance_uid)
        study = _Study(ctx, job_id, timer, early, attempt)
        done = segment_study(study, plan)
        model, card, assembled = done.route.model, done.route.model.card, done.assembled
        labels, report, chosen = done.labels, done.report, done.route.assignment.chosen
        reason = routing_reason(plan, done.route)
        if done.extent:
            reason = f"{reason}; {done.extent}"
        routing = {
            "task": done.route.task,
            "model": model.label,
            "reason": reason,
            "whole_tumour_extent": done.extent,
            "considered": plan.considered,
        }
        # The preview is drawn in a thread of its own while the SEG and SR are encoded: its percentile
        # and PNG compression run outside the GIL (~0.1 s off a job, two cores).
        preview_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preview")
        spacing = assembled.reference.spacing
        preview = preview_pool.submit(
            render_preview, assembled.reference.array, labels, pixel_spacing=(spacing[1], spacing[2])
        )
        preview_pool.shutdown(wait=False)
        # Earlier results of this run already queued for sending (one folder per attempt): a retried
        # done job's result gets series of its own, not a second series under theirs in the PACS.
        resend = len({str(Path(send.path).parent) for send in info.sends} - {str(out_dir)})
        # Early analysis encodes a first run's first SEG as it is when QC passes; a re-run's or a
        # retry's carries its own series number, and a result that failed QC says so (it is sent only
        # once released).
        seg_bytes = done.seg_file if info.run <= 1 and resend == 0 and report.passed else None
        if seg_bytes is not None:
            study.reused.append(f"seg {done.route.task}")
        elif labels.any():
            with timer.stage("seg"):
                seg_bytes = encode_seg(done, run=info.run, resend=resend, qc_failed=not report.passed)
        # The SR refers to the SEG as written (parsing it back takes well under 1 ms).
        seg = pydicom.dcmread(io.BytesIO(seg_bytes)) if seg_bytes is not None else None
        volumes = segment_volumes_ml(labels, card, assembled.reference)
        with timer.stage("sr"):
            sr = build_sr(
                seg,
                assembled.sources,
                volumes,
                card,
                other_evidence=assembled.others,
                brain_volume_ml=report.figures["brain_volume_ml"],
                tumour_share_percent=report.figures["tumour_share_of_brain_percent"],
                brain_in_series_only=bool(report.figures.get("brain_slab")),
                regions=region_volumes_ml(labels, card, assembled.reference),
                routing=reason,
                series=series_used(done.route.assignment),
                run=info.run,
                resend=resend,
                qc_failed=[(rule.name, rule.message) for rule in report.failed],
                cautions=[(caution.name, caution.message) for caution in report.cautions],
            )
        with timer.stage("write"):
            out_dir.mkdir(parents=True, exist_ok=True)
            seg_path, sr_path = out_dir / "seg.dcm", out_dir / "sr.dcm"
            if seg_bytes is not None:
                write_atomic(seg_path, seg_bytes)
            _save(sr, sr_path)
            write_atomic(out_dir / "preview.png", preview.result())
        outputs = [OutputObject(str(sr_path), str(sr.SOPInstanceUID))]
        if seg is not None:
            outputs.insert(0, OutputObject(str(seg_path), str(seg.SOPInstanceUID)))
        brain = done.brain
        digest = inputs_digest(
            done.route, brain.extractor if brain is not None else None, result_settings(ctx, done.route)
        )
        result = {
            "seg": str(seg_path) if seg is not None else None,
            "sr": str(sr_path),
            "preview": str(out_dir / "preview.png"),
            "seg_sop_instance_uid": str(seg.SOPInstanceUID) if seg is not None else None,
            "sr_sop_instance_uid": str(sr.SOPInstanceUID),
            "series": {m: s.series_instance_uid for m, s in chosen.items()},
            # For `segnode jobs show`: each input's series as a reader recognises it (UID, description,
            # slices).
            "series_labels": {m: s.label for m, s in chosen.items()},
            "series_basis": done.route.assignment.reasons(),
            # A chosen series that could not be read and the candidate used in its place.
            "series_replaced": list(done.route.assignment.replaced),
            # Every other series of the study and why it served no input (at most 50, then a count).
            "not_used": ctx.selector.not_used(series, done.route.assignment),
            "volumes_ml": [round(v, 3) for v in volumes],
            "regions_ml": {
                k: round(v, 3) for k, v in region_volumes_ml(labels, card, assembled.reference).items()
            },
            "tumour_volume_ml": report.figures["tumour_volume_ml"],
            "brain_volume_ml": report.figures["brain_volume_ml"],
            "tumour_share_of_brain_percent": report.figures["tumour_share_of_brain_percent"],
            "model": {"name": card.get("name"), "version": card.get("version"), "label": model.label},
            # How the network ran ([inference]): mirror images and slice axes averaged.
            "inference": {"mirror": model.segmenter.mirror, "views": getattr(model.segmenter, "views", 1)},
            "routing": routing,
            "registration": done.coregistered.as_dict() if done.coregistered is not None else None,
            "qc": report.as_dict(),
            "outputs": [{"path": o.path, "sop_instance_uid": o.sop_instance_uid} for o in outputs],
            "brain_extractor": brain.extractor if brain is not None else None,
            # What the result depends on: a later run with the same sends nothing again.
            "inputs_digest": digest,
            # What early analysis had computed before the study was complete (and its stage times).
            "early_analysis": {"reused": study.reused, "stages": early.stages} if early is not None else None,
        }
        # Inside the try: a job.json that cannot be written (disk full) or serialised ends the job
        # failed, rather than leaving it running to be re-queued and fail the same way for ever.
        job_json = json.dumps({"job": job_id, "stages": timer.stages, **result}, indent=2)
        write_atomic(out_dir / "job.json", job_json.encode())
    except (DatabaseUnavailableError, DatabaseOperationError):
        # The database, not the study: the worker loop reports the outage and queues the job again
        # once the database answers (node/service.py); ending it failed would lose it for good.
        raise
    except JobSupersededError as exc:  # the later claim's run ends the job
        logger.warning("%s; this run stops and ends nothing", exc)
        return "superseded"
    except JobError as exc:  # an InferenceError quotes a library's text, which may quote a value
        log_reason = scrub_text(str(exc)) if isinstance(exc, InferenceError) else None
        status = "skipped" if exc.skip else "failed"
        return _end(
            ctx, job_id, attempt, status, str(exc), timer, model, log_reason=log_reason, missing=missing,
            incomplete=incomplete,
        )  # fmt: skip
    except (NodeError, ConverterError, OSError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        return _end(
            ctx, job_id, attempt, "failed", reason, timer, model, missing=missing, incomplete=incomplete
        )
    except ValueError as exc:  # often a library's (pydicom, highdicom), whose text may quote a value
        reason = f"{type(exc).__name__}: {exc}"
        return _end(
            ctx, job_id, attempt, "failed", reason, timer, model,
            log_reason=scrub_text(reason), missing=missing, incomplete=incomplete,
        )  # fmt: skip
    except Exception as exc:  # a bug or an unforeseen input: the job fails, the worker goes on
        # The traceback through the log scrubber: a library's message may quote an attribute's value.
        logger.error("job %d: unexpected error\n%s", job_id, scrub_text("".join(format_exception(exc))))
        reason = f"internal error: {type(exc).__name__}: {exc}"
        return _end(
            ctx, job_id, attempt, "failed", reason, timer, model,
            log_reason=scrub_text(reason), missing=missing, incomplete=incomplete,
        )  # fmt: skip
    # A later part of the study that changed nothing the model used (a DWI, a key object) made this run:
    # its SEG and SR are those already sent, and sending them again piles up identical series in the
    # PACS. `segnode jobs retry` sends anyway: an administrator asked for it. Checked before the QC
    # hold: a result that fails QC the same way (the digest covers the [qc] limits) was sent only
    # because an administrator released it, and holding it again would ask for the same release and
    # send the same SEG twice.
    for caution in report.cautions:  # in the SR just written, whether the result is then sent or held
        ctx.metrics.qc_cautions.labels(caution.name).inc()
    retried = job_queue.RETRY_REQUESTED in info.result
    again = None if retried else _not_again(ctx, job_id, digest)
    if again is not None:
        reason, rest = again
        logger.info("job %d: %s", job_id, reason)
        return _end(
            ctx, job_id, attempt, "done", reason, timer, model, result=result, out_dir=out_dir,
            outputs=outputs if rest else None, destinations=rest, missing=missing, incomplete=incomplete,
        )  # fmt: skip
    if not report.passed:
        for rule in report.failed:
            ctx.metrics.qc_failures.labels(rule.name).inc()
        return _end(
            ctx, job_id, attempt, "review", report.reason(), timer, model, result=result, out_dir=out_dir,
            missing=missing, incomplete=incomplete,
        )  # fmt: skip
    return _end(
        ctx, job_id, attempt, "done", "", timer, model, result=result, out_dir=out_dir, outputs=outputs,
        missing=missing, incomplete=incomplete,
    )  # fmt: skip


def encoded(ds: Dataset) -> bytes:
    """``ds`` as a DICOM file (preamble, file meta information, data set)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _save(ds: Dataset, path: Path) -> None:
    write_atomic(path, encoded(ds))


def _end(
    ctx: JobContext,
    job_id: int,
    attempt: int,
    status: str,
    reason: str,
    timer: Timer,
    model: LoadedModel | None = None,
    *,
    result: dict[str, Any] | None = None,
    out_dir: Path | None = None,
    outputs: list[OutputObject] | None = None,
    log_reason: str | None = None,
    missing: Sequence[str] = (),
    destinations: list[Destination] | None = None,
    incomplete: str = "",
) -> str:
    """End job ``job_id``, claimed at ``attempt``, with ``status`` and ``reason`` (``log_reason``: the
    reason as the log line gives it, when it may quote a value of the study that ``reason``, kept in
    the job, still shows); ``superseded`` when the job was claimed again meanwhile. ``missing``: the
    SOP Instance UIDs left out for want of their spool file, kept in the result (``instances_missing``).
    ``destinations``: where ``outputs`` go (None: every destination of the node). ``incomplete``: the
    series analysed with fewer images than announced once the wait ran out (:func:`incomplete_series`),
    kept in the result (``series_incomplete``) and the reason."""
    if missing:
        result = {**(result or {}), "instances_missing": list(missing)}
    if incomplete:
        result = {**(result or {}), "series_incomplete": incomplete}
        reason = f"{reason}; {incomplete}" if reason else incomplete
    if status != "done":
        logger.warning("job %d %s: %s", job_id, status, reason if log_reason is None else log_reason)
    else:
        logger.info("job %d done in %.2f s", job_id, sum(timer.stages.values()))
    finished = job_queue.finish_job(
        ctx.sf,
        job_id,
        status=status,
        reason=reason,
        stages=timer.stages,
        result=result,
        output_dir=str(out_dir) if out_dir else None,
        model_label=model.label if model else None,
        model_id=model.info.id if model else None,
        outputs=outputs,
        destinations=ctx.destinations if destinations is None else destinations,
        attempt=attempt,
    )
    if not finished:
        return "superseded"
    ctx.metrics.jobs_finished.labels(status).inc()
    if outputs and ctx.destinations and ctx.outputs_queued is not None:
        ctx.outputs_queued()
    return status
