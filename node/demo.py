"""``segnode demo``: the whole clinical path on this machine, with nothing configured.

A fresh SQLite database and spool under ``WORKDIR/var``, the shipped model (models/default)
imported and promoted, the shipped BraTS case converted to a four-series DICOM MR study and sent
over C-STORE to a node on a free loopback port; a receiving SCP on another free port catches the
SEG and the SR. The report holds the stage timings, the whole-tumour Dice of the returned SEG (every
segment) against the case's ground truth and the whole-tumour volume the SR states; seg.dcm, sr.dcm
and preview.png are left in the work directory.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    SegmentationStorage,
)

from node import dimse, qc
from node.bootstrap import install_and_promote
from node.config import Destination, Settings
from node.exceptions import NodeError

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "default"
#: A validation case of both shipped models (never trained on; not a holdout case): models/demo_case/NOTICE.
DEFAULT_CASE = REPO / "models" / "demo_case" / "BraTS2021_00005"
CATCHER_AE = "DEMO_PACS"


@dataclass
class DemoReport:
    """What the demo measured."""

    case_id: str
    model_label: str
    stages: dict[str, float]
    total: float
    #: Whole-tumour Dice of the returned SEG; None when neither it nor the truth holds tumour (n/a).
    dice: float | None
    volume_ml: float
    files: list[Path] = field(default_factory=list)
    #: CPU seconds this process (node, catcher) used from the first C-STORE to the SEG received.
    cpu_seconds: float = 0.0
    #: Instances sent.
    instances: int = 0
    #: What the case was to the model's training run: "training", "validation" or None (neither, or
    #: its card records no split). A Dice on a training or validation case is no held-out figure.
    case_role: str | None = None


def case_role(card: Mapping[str, Any], case_id: str) -> str | None:
    """What ``case_id`` was to the training run of the model with ``card``: "training", "validation"
    or None (neither, or the card records no split: ``training.split`` of docs/model-card.md)."""
    split = (card.get("training") or {}).get("split") or {}
    if case_id in split.get("train", []):
        return "training"
    if case_id in split.get("val", []):
        return "validation"
    return None


def mask_dice(a: Any, b: Any) -> float | None:
    """Dice of two masks; None when both are empty (no tumour to agree on: shown "n/a", not 0)."""
    both = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    return qc.dice(*both) if any(m.any() for m in both) else None


def returned_tumour(seg: Any, source_uids: Sequence[str]) -> npt.NDArray[np.bool_]:
    """The whole tumour of a returned SEG on its source frames (frames, rows, columns): the union of
    every segment (a ``brats_regions`` model's edema, non-enhancing and enhancing tumour alike).

    ``seg`` is a ``highdicom.seg.Segmentation``; ``source_uids`` the source series' SOP Instance UIDs
    in slice order.
    """
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(source_uids),
        segment_numbers=list(seg.segment_numbers),
        assert_missing_frames_are_empty=True,
    )
    return np.asarray((np.asarray(pixels) > 0).any(axis=-1), dtype=bool)


def _volume_of(group: Any) -> float:
    [measurement] = [m for m in group.get_measurements() if m.name == codes.SCT.Volume]
    return float(measurement.value)


def reported_tumour_volume_ml(report: Any) -> float:
    """The whole-tumour volume (mL) a returned SR states (``report``: its TID 1500 content).

    A ``brats_regions`` model's report has a whole-tumour group (:data:`node.sr.REGIONS`); otherwise
    the whole tumour is the sum of the segments' groups (one for a ``whole_tumor`` model; 0 mL
    groups when nothing was found). The brain group is neither.
    """
    from node.sr import REGIONS

    groups = [*report.get_volumetric_roi_measurement_groups(), *report.get_image_measurement_groups()]
    whole = REGIONS["whole_tumour"][1]
    for group in groups:
        if group.tracking_identifier == whole:
            return _volume_of(group)
    return sum(_volume_of(g) for g in groups if str(g.tracking_identifier).startswith("segment "))


class Catcher:
    """A storage SCP that keeps the SEG and SR it receives."""

    def __init__(self, port: int) -> None:
        self.received: list[Dataset] = []
        self.arrived = threading.Event()
        ae = AE(ae_title=CATCHER_AE)
        ae.add_supported_context(SegmentationStorage, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Comprehensive3DSRStorage, ALL_TRANSFER_SYNTAXES)
        self.ae = ae
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on)]
        )

    def _on(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        if {d.Modality for d in self.received} >= {"SEG", "SR"}:
            self.arrived.set()
        return dimse.SUCCESS

    def stop(self) -> None:
        """Stop listening."""
        if self.server is not None:
            self.server.shutdown()


#: The report's stages of early analysis (node/early.py), done while the study arrived: inside the
#: "C-STORE of the study" stage, not after it.
EARLY_STAGE_PREFIX = "early (during C-STORE): "


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _settings(var: Path, port: int, catcher_port: int) -> Settings:
    settings = Settings()
    settings.node.port = port
    settings.node.spool_dir = str(var / "spool")
    settings.node.study_idle_seconds = 0.5
    settings.node.poll_seconds = 0.05
    settings.node.min_free_disk_mb = 50
    settings.database.url = f"sqlite:///{var / 'segnode.db'}"
    settings.metrics.port = 0
    settings.destinations = [Destination("demo-pacs", CATCHER_AE, "127.0.0.1", catcher_port)]
    return settings


def _storescu(program: str, files: list[Path], port: int, called_ae: str) -> None:
    import os
    import subprocess

    proc = subprocess.run(
        [program, "-aet", "DEMO_SCU", "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    if proc.returncode != 0:
        raise NodeError(f"storescu failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")


def _step(console: Any, text: str) -> None:
    if console is not None:
        console.print(f"[dim]·[/] {text}")


def run_demo(
    workdir: Path,
    *,
    model_dir: Path | None = None,
    case_dir: Path | None = None,
    console: Any = None,
    timeout: float = 300.0,
    storescu: str | None = None,
    early_analysis: bool = True,
    series_order: Sequence[str] | None = None,
) -> DemoReport:
    """Run the demo in ``workdir``; see the module docstring.

    ``storescu``: path of DCMTK's storescu to send the study with (a stand-in for a PACS), instead
    of the node's own pynetdicom SCU. ``early_analysis``: the node's ``[node] early_analysis``; the
    report's stages then include what early analysis did while the study arrived. ``series_order``:
    the modalities in the order their series are sent (default: the case's, FLAIR first).
    """
    import highdicom as hd

    from converters.dicom_series import load_series
    from converters.dicom_writer import write_study
    from converters.nifti import load_case
    from converters.reorient import ras_to_volume
    from db import job_queue
    from node.log_scrub import install as scrub_library_logs
    from node.sender import store_files
    from node.service import NodeService

    scrub_library_logs()
    model_dir = Path(model_dir or DEFAULT_MODEL)
    case_dir = Path(case_dir or DEFAULT_CASE)
    workdir = workdir.absolute()
    var = workdir / "var"
    shutil.rmtree(var, ignore_errors=True)
    shutil.rmtree(workdir / "study", ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}

    catcher_port = _free_port()
    settings = _settings(var, _free_port(), catcher_port)
    settings.node.early_analysis = early_analysis
    node = NodeService(settings)
    model = install_and_promote(node.registry, model_dir, by="segnode demo", reason="demo")
    _step(console, f"model {model.label} imported and promoted")

    t = time.perf_counter()
    case = load_case(case_dir)
    study = write_study(case, workdir / "study")
    stages["convert NIfTI to DICOM (not part of the node)"] = time.perf_counter() - t
    order = list(series_order) if series_order is not None else list(study.files)
    files = [p for modality in order for p in study.files[modality]]
    _step(console, f"case {case.case_id}: DICOM study of {len(study.files)} series, {len(files)} files")

    catcher = Catcher(catcher_port)
    node.start()
    try:
        _step(console, f"node {settings.node.ae_title} on 127.0.0.1:{node.scp.port}; sending the study")
        start, cpu_start = time.perf_counter(), time.process_time()
        if storescu:
            _storescu(storescu, files, node.scp.port, settings.node.ae_title)
        else:
            results = store_files(files, "127.0.0.1", node.scp.port, settings.node.ae_title, "DEMO_SCU")
            bad = [str(p) for p, status, _ in results if status != dimse.SUCCESS]
            if bad:
                raise NodeError(f"the node refused {len(bad)} files, e.g. {bad[0]}")
        stages["C-STORE of the study"] = time.perf_counter() - start
        if not catcher.arrived.wait(timeout):
            jobs = job_queue.list_jobs(node.sf)
            why = f"job {jobs[0].id} {jobs[0].status}: {jobs[0].reason}" if jobs else "no job was created"
            raise NodeError(f"no SEG and SR came back within {timeout:.0f} s ({why})")
        total = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        job = job_queue.list_jobs(node.sf)[0]
    finally:
        node.stop()
        catcher.stop()
    stages["study idle wait (study_idle_seconds)"] = settings.node.study_idle_seconds
    for name, seconds in job.stages.items():
        stages[f"job: {name}"] = float(seconds)
    early_stages = (job.result.get("early_analysis") or {}).get("stages") or {}
    stages["send SEG + SR back, rest"] = max(
        0.0, total - sum(v for k, v in stages.items() if not k.startswith("convert"))
    )
    for name, seconds in early_stages.items():  # while the study arrived: inside "C-STORE of the study"
        stages[f"{EARLY_STAGE_PREFIX}{name}"] = float(seconds)

    seg_ds = next(ds for ds in catcher.received if ds.Modality == "SEG")
    sr_ds = next(ds for ds in catcher.received if ds.Modality == "SR")
    seg_path, sr_path, preview = workdir / "seg.dcm", workdir / "sr.dcm", workdir / "preview.png"
    seg_ds.save_as(seg_path, enforce_file_format=True)
    sr_ds.save_as(sr_path, enforce_file_format=True)
    shutil.copyfile(job.result["preview"], preview)

    flair = load_series(study.files["FLAIR"])
    returned = returned_tumour(hd.seg.segread(seg_path), flair.sop_instance_uids)
    truth = np.asarray(ras_to_volume(case.whole_tumor(), flair)) > 0
    dice = mask_dice(returned, truth)
    volume_ml = reported_tumour_volume_ml(hd.sr.srread(sr_path).content)
    return DemoReport(
        case_id=case.case_id,
        model_label=f"{model.name} {model.version} {model.precision}",
        stages=stages,
        total=total,
        dice=dice,
        volume_ml=volume_ml,
        files=[seg_path, sr_path, preview],
        cpu_seconds=cpu_seconds,
        instances=len(files),
        case_role=case_role(model.card or {}, case.case_id),
    )
