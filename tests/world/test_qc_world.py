"""Checks before anything leaves the node, against a running node on real sockets.

A result that fails a QC rule ends ``review``: nothing is sent, the /metrics counter and one log line
say why, and ``segnode jobs retry ID --send-anyway`` sends the SEG and SR it wrote (the model does not
run again). A study without tumour gets an SR of 0 mL and no SEG. Bad input (noise, a localizer-only
study, three slices, a FLAIR whose brain extraction finds nothing) gets a clear reason, sends nothing,
loses nothing (spool files and instance rows stay), and the node goes on serving.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from converters.dicom_writer import StudyInfo
from converters.synthetic import make_synthetic_case
from db import job_queue
from node import pipeline
from node.config import Destination
from node.service import NodeService
from tests.helpers.node import CatchingSCP, install_model, make_threshold_model, node_settings
from tests.helpers.peers import REPO
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until
from tests.helpers.world import World as BaseWorld

SHAPE = (48, 48, 16)


class World(BaseWorld):
    """The QC world: what the PACS received, spool checks, model swaps, QC metrics."""

    def received(self, study_uid: str) -> list[str]:
        """Modalities of what the PACS received for a study."""
        with self.catcher.changed:
            return sorted(
                str(ds.Modality) for ds in self.catcher.received if ds.StudyInstanceUID == study_uid
            )

    def nothing_lost(self, job: job_queue.JobInfo, files: list[Path]) -> None:
        """Every sent instance still has its row (kept) and its spool file."""
        sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
        spooled = [Path(p) for p in job_queue.job_instance_paths(self.node.sf, job.id)]
        assert len(spooled) == len(files) and all(p.is_file() for p in spooled)
        assert {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in spooled} == sent

    def still_serves(self, name: str) -> None:
        """A good study sent now is processed and its SEG and SR delivered."""
        study = self.study(name)
        self.send(study.files["FLAIR"])
        job = self.job(study.study_instance_uid)
        assert job.status == "done", job.reason
        self.catcher.wait_for(lambda r: self.received(study.study_instance_uid) == ["SEG", "SR"], 30)

    def use_model(self, model_dir: Path) -> Callable[[], None]:
        """Promote another model for a while; returns the function that puts the usual one back."""
        serving = self.node.runtime.current
        assert serving is not None
        promoted = install_model(self.node.registry, model_dir)
        wait_until(
            lambda: (m := self.node.runtime.refresh()) is not None and m.info.id == promoted.id, 30, "swap"
        )

        def restore() -> None:
            self.node.registry.promote(serving.info.id, by="test", reason="back to the usual model")
            wait_until(
                lambda: (m := self.node.runtime.refresh()) is not None and m.info.id == serving.info.id,
                30,
                "back",
            )

        return restore

    def analyse_with(self, model_dir: Path, name: str) -> tuple[StudyInfo, job_queue.JobInfo]:
        """The world's case written as study ``name``, sent while ``model_dir``'s model serves, and its
        ended job; the usual model serves again afterwards."""
        restore = self.use_model(model_dir)
        study = self.study(name)
        try:
            self.send(study.files["FLAIR"])
            return study, self.job(study.study_instance_uid)
        finally:
            restore()

    def qc_cautions(self) -> dict[str, float]:
        text = self.node.metrics.render().decode()
        return {
            m[0]: float(m[1])
            for m in re.findall(r'segnode_qc_cautions_total\{caution="(\w+)"\} ([0-9.]+)', text)
        }

    def qc_failures(self) -> dict[str, float]:
        text = self.node.metrics.render().decode()
        return {
            m[0]: float(m[1])
            for m in re.findall(r'segnode_qc_failures_total\{rule="(\w+)"\} ([0-9.]+)', text)
        }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("qcworld")
    case = make_synthetic_case(21, SHAPE)
    catcher = CatchingSCP().start(free_port())
    settings = node_settings(
        tmp, free_port(), [Destination("pacs", catcher.ae_title, "127.0.0.1", catcher.port)]
    )
    node = NodeService(settings)
    model_dir = make_threshold_model(tmp / "model", crop=SHAPE[:2], spacing=case.spacing)
    install_model(node.registry, model_dir)
    node.start()
    try:
        yield World(node, catcher, tmp, case, model_dir)
    finally:
        node.stop()
        catcher.stop()


def segnode(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    """``segnode ARGS --config node.toml`` in a subprocess, against the running node's database."""
    config = world.tmp / "cli.toml"
    dest = world.node.settings.destinations[0]
    config.write_text(
        f'[database]\nurl = "{world.node.settings.database.url}"\n\n'
        f'[[destinations]]\nname = "{dest.name}"\nae_title = "{dest.ae_title}"\nhost = "{dest.host}"\n'
        f"port = {dest.port}\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SEGNODE_HOME": str(world.tmp / "cli-home"),
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "node", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


# -- review and release ----------------------------------------------------------------------------------


def test_an_implausible_result_is_held_for_review_then_sent_anyway(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A model that outlines the whole brain (the healthy-volunteer failure of issue 15): the tumour is
    ~100 % of the imaged head, the job ends review, nothing is sent; released, the SEG and SR it wrote
    reach the PACS, unchanged, and the job is done with who released it."""
    outline_all = make_threshold_model(
        world.tmp / "outline-all", version="6.6.6", threshold=-5.0, crop=SHAPE[:2], spacing=world.case.spacing
    )
    before = world.qc_failures().get("tumour_share_of_head", 0.0)
    with caplog.at_level(logging.WARNING, logger="node.pipeline"):
        study, job = world.analyse_with(outline_all, "whole-brain")
    assert job.status == "review", job.reason
    assert job.reason.startswith("qc tumour_share_of_head: tumour "), job.reason
    share = re.search(r"is ([\d.]+) % of the imaged head \([\d.]+ mL\), over 30 %", job.reason)
    assert share and float(share.group(1)) > 90, job.reason
    # One log line with the reason, no patient data.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"job {job.id} ")]
    assert lines == [f"job {job.id} review: {job.reason}"]
    patient = pydicom.dcmread(study.files["FLAIR"][0], stop_before_pixels=True)
    assert str(patient.PatientName) not in caplog.text and str(patient.PatientID) not in caplog.text
    assert world.qc_failures()["tumour_share_of_head"] == before + 1
    # Figures in the job: volumes, share, model; the rules with their status.
    result = job.result
    assert result["model"] == {"name": "test-threshold", "version": "6.6.6", "label": job.model_label}
    assert result["tumour_volume_ml"] > 1000 and result["brain_volume_ml"] is None
    rules = {r["name"]: r["status"] for r in result["qc"]["rules"]}
    assert rules["tumour_share_of_head"] == "failed" and rules["brain_volume"] == "not checked"
    assert Path(result["seg"]).is_file() and Path(result["sr"]).is_file()
    assert job.sends == [] and world.received(study.study_instance_uid) == []
    world.nothing_lost(job, study.files["FLAIR"])

    listed = segnode(world, "jobs", "list", "--status", "review", "--json")
    assert listed.returncode == 0, listed.stderr
    assert job.id in [j["id"] for j in json.loads(listed.stdout)]
    shown = segnode(world, "jobs", "show", str(job.id))
    assert shown.returncode == 0, shown.stderr
    for text in (
        "review",
        "tumour volume",
        "no brain mask",
        "test-threshold 6.6.6",
        "qc tumour_share_of_head",
    ):
        assert text in shown.stdout, shown.stdout

    released = segnode(world, "jobs", "retry", str(job.id), "--send-anyway", "--by", "dr-review")
    assert released.returncode == 0, released.stdout + released.stderr
    assert f"job {job.id} released by dr-review: seg.dcm, sr.dcm queued to pacs" in released.stdout
    got = world.catcher.wait_for(lambda r: world.received(study.study_instance_uid) == ["SEG", "SR"], 30)
    sent = {
        str(ds.Modality): str(ds.SOPInstanceUID)
        for ds in got
        if ds.StudyInstanceUID == study.study_instance_uid
    }
    assert sent == {"SEG": result["seg_sop_instance_uid"], "SR": result["sr_sop_instance_uid"]}
    after = job_queue.get_job(world.node.sf, job.id)
    assert after.status == "done" and after.attempts == job.attempts  # the model did not run again
    assert after.reason == f"released by dr-review after review ({job.reason})"
    assert after.result["released_by"] == "dr-review"
    wait_until(
        lambda: all(s.status == "done" for s in job_queue.get_job(world.node.sf, job.id).sends), 30, "sends"
    )
    again = segnode(world, "jobs", "retry", str(job.id), "--send-anyway")
    assert again.returncode == 2
    assert again.stderr.strip() == (
        f"error: job {job.id} is done; only a job in review can be sent anyway "
        "(`segnode jobs list --status review`)"
    )


@pytest.mark.parametrize(
    ("threshold", "name", "version"),
    [
        pytest.param(0.3, "large_tumour", "1.5.0", id="over-15-percent-of-the-head"),
        pytest.param(3.2, "small_tumour", "4.0.0", id="under-5-mL"),
    ],
)
def test_a_result_with_a_caution_is_sent_and_its_sr_says_it(
    world: World, threshold: float, name: str, version: str
) -> None:
    """A result over 15 % of the imaged head (so more of the brain, beyond the shipped models' training
    tumours), or under 5 mL (what brains without tumour came back with), is sent, not held: its SR says
    why under Qualitative Evaluations (take the volume as a lower bound; check it against the images),
    and so do the job's result, `segnode jobs show` and /metrics."""
    model = make_threshold_model(
        world.tmp / name, version=version, threshold=threshold, crop=SHAPE[:2], spacing=world.case.spacing
    )
    before = world.qc_cautions().get(name, 0.0)
    study, job = world.analyse_with(model, name)
    assert job.status == "done", job.reason
    [caution] = job.result["qc"]["cautions"]
    assert caution["name"] == name, caution
    if name == "large_tumour":
        assert 15.0 < caution["figures"]["share_percent"] <= 30.0, caution
        assert caution["message"].endswith("take the volume as a lower bound")
    else:
        assert 0 < job.result["tumour_volume_ml"] < 5.0, caution
        assert caution["message"].endswith("check it against the images before reading it as a tumour")
    assert world.qc_cautions()[name] == before + 1
    got = world.catcher.wait_for(lambda r: world.received(study.study_instance_uid) == ["SEG", "SR"], 30)
    [sr] = [ds for ds in got if ds.StudyInstanceUID == study.study_instance_uid and ds.Modality == "SR"]
    [container] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    [item] = container.ContentSequence
    assert item.ConceptNameCodeSequence[0].CodeValue == "QC_CAUTION"
    assert item.TextValue == f"caution {name}: {caution['message']}"
    assert not sr.SeriesDescription.startswith("QC FAILED")
    shown = segnode(world, "jobs", "show", str(job.id))
    assert shown.returncode == 0, shown.stderr
    assert f"qc caution {name}" in shown.stdout and caution["message"][:60] in shown.stdout
    listed = segnode(world, "jobs", "list", "--status", "done")
    assert listed.returncode == 0, listed.stderr
    assert f"sent with caution {name}" in listed.stdout, listed.stdout


def test_no_tumour_sends_an_sr_of_zero_ml_and_no_seg(world: World) -> None:
    """The PACS learns the study was analysed: an SR with 0 mL; no SEG (an empty SEG would show a
    'Whole tumour' segment with nothing in it)."""
    blind = make_threshold_model(
        world.tmp / "blind", version="0.0.1", threshold=50.0, crop=SHAPE[:2], spacing=world.case.spacing
    )
    study, job = world.analyse_with(blind, "no-tumour")
    assert job.status == "done", job.reason
    assert job.result["seg"] is None and job.result["volumes_ml"] == [0.0]
    assert job.result["tumour_volume_ml"] == 0.0
    got = world.catcher.wait_for(lambda r: world.received(study.study_instance_uid) == ["SR"], 30)
    [sr] = [ds for ds in got if ds.StudyInstanceUID == study.study_instance_uid]
    [container] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    [group] = container.ContentSequence
    [volume] = [i for i in group.ContentSequence if i.ValueType == "NUM"]
    assert volume.ConceptNameCodeSequence[0].CodeValue == "118565006"
    assert float(volume.MeasuredValueSequence[0].NumericValue) == 0.0
    assert not (Path(job.output_dir or "") / "seg.dcm").exists()


# -- bad input -------------------------------------------------------------------------------------------


def _noise(files: list[Path]) -> None:
    rng = np.random.default_rng(7)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PixelData = rng.integers(0, 1200, (int(ds.Rows), int(ds.Columns)), dtype=np.uint16).tobytes()
        ds.save_as(path, enforce_file_format=True)


def _localizers(files: list[Path]) -> list[Path]:
    """Three single-slice localizers in one series: axial, sagittal, coronal (a GE "3-Plane Loc")."""
    series_uid = generate_uid()
    orientations = ([1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 0, -1])
    out = []
    for n, (path, iop) in enumerate(zip(files, orientations, strict=False), start=1):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription, ds.ProtocolName, ds.SeriesNumber, ds.InstanceNumber = (
            "3-Plane Loc",
            "3-Plane Loc",
            1,
            n,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = iop
        ds.ScanningSequence, ds.SequenceVariant, ds.EchoTime, ds.RepetitionTime = "GR", "SS", 1.6, 5.0
        if "InversionTime" in ds:
            del ds.InversionTime
        target = path.with_name(f"loc{n}.dcm")
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def test_pure_noise_is_held_for_review(world: World) -> None:
    study = world.study("noise")
    files = study.files["FLAIR"]
    _noise(files)
    world.send(files)
    job = world.job(study.study_instance_uid)
    assert job.status == "review", job.reason
    assert re.fullmatch(
        r"qc head_found: imaged head [\d.]+ mL, under 50 mL: a blank or noise image", job.reason
    )
    assert world.received(study.study_instance_uid) == [] and job.sends == []
    world.nothing_lost(job, files)
    world.still_serves("after-noise")


def test_a_localizer_only_study_is_skipped(world: World) -> None:
    study = world.study("localizer")
    files = _localizers(study.files["FLAIR"][6:9])
    world.send(files)
    job = world.job(study.study_instance_uid)
    assert job.status == "skipped"
    series = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert job.reason == f"no FLAIR series in the study (considered: series {series} (3-Plane Loc, 3 slices))"
    assert world.received(study.study_instance_uid) == [] and job.sends == []
    world.nothing_lost(job, files)
    world.still_serves("after-localizer")


def test_a_series_of_three_slices_is_held_for_review(world: World) -> None:
    study = world.study("three-slices")
    files = study.files["FLAIR"][6:9]
    world.send(files)
    job = world.job(study.study_instance_uid)
    assert job.status == "review", job.reason
    assert job.reason.startswith("qc series_slices: 3 slices, fewer than 8"), job.reason
    assert world.received(study.study_instance_uid) == [] and job.sends == []
    world.nothing_lost(job, files)
    world.still_serves("after-three-slices")


def test_a_flair_whose_brain_extraction_finds_nothing_fails_with_the_reason(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The brain stage finds no brain (its NoBrainFoundError, stood in for here; the real extractor
    raises it on noise and on a non-head series, tests/node/test_brain_extraction.py): the job fails
    with the reason, nothing is sent, nothing is lost, the node serves on."""
    from converters.brain_mask import NoBrainFoundError

    def no_brain(*_args: object, **_kw: object) -> None:
        raise NoBrainFoundError("FLAIR: brain extraction found no brain (box network: nothing above 0.5)")

    monkeypatch.setattr(pipeline, "extract_brain", no_brain)
    monkeypatch.setattr(world.node.context, "brain", lambda: object())
    study = world.study("no-brain")
    world.send(study.files["FLAIR"])
    job = world.job(study.study_instance_uid)
    monkeypatch.undo()
    assert job.status == "failed", job.reason
    assert job.reason.startswith("NoBrainFoundError: FLAIR: brain extraction found no brain"), job.reason
    assert world.received(study.study_instance_uid) == [] and job.sends == []
    world.nothing_lost(job, study.files["FLAIR"])
    world.still_serves("after-no-brain")
