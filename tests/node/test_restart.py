"""The node killed with SIGKILL mid-job and restarted delivers the SEG exactly once (real BraTS case)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from converters.dicom_series import load_series
from converters.dicom_writer import write_study
from converters.nifti import load_case
from converters.reorient import ras_to_volume
from db.registry import open_registry
from db.session import make_engine, make_session_factory
from node import store
from node.sender import store_files
from tests.helpers.node import CatchingSCP, install_model, make_threshold_model, wait_until
from tests.helpers.peers import REPO, free_port, require_shared

SEGNODE = [sys.executable, "-m", "node"]


def _echo_ok(port: int) -> bool:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SEGNODE")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status and status.Status == 0)


class Served:
    """``segnode serve`` in a subprocess."""

    def __init__(self, config: Path, home: Path, log: Path) -> None:
        self.config, self.home, self.log = config, home, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int) -> None:
        env = {**os.environ, "SEGNODE_HOME": str(self.home), "PYTHONPATH": str(REPO)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*SEGNODE, "-v", "serve", "--config", str(self.config)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        wait_until(
            lambda: self._alive() and _echo_ok(port), 60, f"segnode serve on port {port}", interval=0.2
        )

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"segnode serve exited {self.proc.returncode}: {self.log.read_text()[-2000:]}"
            )
        return True

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture()
def catcher() -> Iterator[CatchingSCP]:
    scp = CatchingSCP().start(free_port())
    yield scp
    scp.stop()


@pytest.mark.slow
def test_sigkill_mid_job_then_restart_delivers_seg_exactly_once(tmp_path: Path, catcher: CatchingSCP) -> None:
    case_dir = require_shared("train", "brats", "BraTS2021_00005")
    case = load_case(case_dir)
    study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
    model_dir = make_threshold_model(tmp_path / "model", crop=(192, 192), threshold=1.5)
    url = f"sqlite:///{tmp_path / 'node.db'}"
    install_model(open_registry(url), model_dir)
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nport = {port}\nspool_dir = "{tmp_path / "spool"}"\nstudy_idle_seconds = 0.3\n'
        f"poll_seconds = 0.05\nmin_free_disk_mb = 1\nsend_retry_base_seconds = 0.2\n"
        f'[database]\nurl = "{url}"\n[metrics]\nport = 0\n'
        f'[[destinations]]\nname = "pacs"\nae_title = "CATCHER"\nhost = "127.0.0.1"\nport = {catcher.port}\n'
    )
    sf = make_session_factory(make_engine(url))
    served = Served(config, tmp_path / "var", tmp_path / "serve.log")
    try:
        served.start(port)
        results = store_files(study.files["FLAIR"], "127.0.0.1", port, "SEGNODE", "PACS")
        assert {s for _, s, _ in results} == {0}
        job = wait_until(
            lambda: next((j for j in store.list_jobs(sf) if j.status == "running"), None),
            60,
            "a running job",
            interval=0.01,
        )
        served.kill()
        killed = store.get_job(sf, job.id)
        assert killed.status == "running", f"the job ended before the kill: {killed.status}"
        assert catcher.received == []

        served.start(port)
        catcher.wait_for(lambda r: len(r) >= 2, 120)
        wait_until(
            lambda: store.pending_send_count(sf) == 0 and store.get_job(sf, job.id).status == "done",
            30,
            "the job done and its sends acknowledged",
        )
    finally:
        served.stop()
    done = store.get_job(sf, job.id)
    assert done.attempts == 2
    assert "re-queued" not in done.reason
    assert [ds.Modality for ds in catcher.received].count("SEG") == 1
    assert [ds.Modality for ds in catcher.received].count("SR") == 1
    assert "left running by a stopped process" in (tmp_path / "serve.log").read_text()

    # The returned mask equals the model run on the NIfTI case directly.
    from node.segmenter import OpenVINOSegmenter

    card = json.loads((model_dir / "model.json").read_text())
    direct = OpenVINOSegmenter(card, model_dir / "model_fp32.xml").segment(case.images, case.affine)
    volume = load_series(study.files["FLAIR"])
    expected = np.asarray(ras_to_volume(direct, volume)) > 0
    seg_file = tmp_path / "seg.dcm"
    next(ds for ds in catcher.received if ds.Modality == "SEG").save_as(seg_file, enforce_file_format=True)
    seg = hd.seg.segread(seg_file)
    returned = (
        seg.get_pixels_by_source_instance(
            source_sop_instance_uids=volume.sop_instance_uids,
            segment_numbers=[1],
            assert_missing_frames_are_empty=True,
        )[..., 0]
        > 0
    )
    assert expected.sum() > 1000
    dice = 2 * (returned & expected).sum() / (returned.sum() + expected.sum())
    assert dice >= 0.99
