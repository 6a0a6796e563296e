"""Compressed studies as PACS archives send them: DCMTK compresses a study losslessly, storescu sends it
in its own transfer syntax, and the node must return the same SEG as for the uncompressed study.

An MR image class proposed only in a syntax the node cannot decode is refused at negotiation, with a
log line naming it, instead of being acknowledged and failing its job later.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification  # type: ignore[attr-defined]

from converters.case import Case
from converters.dicom_series import readable_transfer_syntaxes
from converters.synthetic import make_synthetic_case
from node import reactor
from node.config import Destination
from node.service import NodeService
from tests.helpers.dcmtk import run_tool, storescu
from tests.helpers.node import CatchingSCP, install_model, make_threshold_model, node_settings
from tests.helpers.peers import require_program
from tests.helpers.ports import free_port
from tests.helpers.world import World

SHAPE = (48, 48, 16)

#: DCMTK's lossless compressors: the transfer syntax each writes by default, and the storescu option
#: that proposes it first (before the uncompressed ones), as a PACS storing compressed images does.
COMPRESSORS = {
    "dcmcjpeg": ("1.2.840.10008.1.2.4.70", "-xs"),  # JPEG Lossless, first-order prediction (SV1)
    "dcmcjpls": ("1.2.840.10008.1.2.4.80", "-xt"),  # JPEG-LS lossless
    "dcmcrle": ("1.2.840.10008.1.2.5", "-xr"),  # RLE lossless
}

#: A syntax pydicom has no decoder for.
JPEG_XL_LOSSLESS = "1.2.840.10008.1.2.4.110"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("syntaxes")
    case: Case = make_synthetic_case(22, SHAPE)
    catcher = CatchingSCP().start(free_port())
    pacs = Destination("pacs", catcher.ae_title, "127.0.0.1", catcher.port)
    settings = node_settings(tmp, free_port(), [pacs])
    node = NodeService(settings)
    install_model(node.registry, make_threshold_model(tmp / "model", crop=SHAPE[:2], spacing=case.spacing))
    node.start()
    try:
        yield World(node, catcher, tmp, case, tmp / "model")
    finally:
        node.stop()
        catcher.stop()


def _seg_of(world: World, files: list[Path], study_uid: str, propose: str = "") -> np.ndarray:
    """Send ``files`` with storescu (``propose``: its option for a compressed syntax); the SEG's
    frames back. With ``-v`` storescu names the syntax it converts each file to: the files' own."""
    result = storescu(world.port, files, extra=["-v", propose] if propose else [])
    assert result.returncode == 0, result.stdout + result.stderr
    if propose:
        output = (result.stdout + result.stderr).splitlines()
        converted = [line for line in output if "Converting transfer syntax" in line]
        assert len(converted) == len(files)
        pairs = [line.split("Converting transfer syntax: ", 1)[1].split(" -> ") for line in converted]
        assert all(source == sent for source, sent in pairs), pairs[0]
    job = world.job(study_uid)
    assert job.status == "done", job.reason
    assert job.instance_count == len(files)
    seg = pydicom.dcmread(job.result["seg"])
    return np.asarray(seg.pixel_array)


@pytest.fixture(scope="module")
def uncompressed_seg(world: World) -> np.ndarray:
    study = world.study("uncompressed")
    return _seg_of(world, study.files["FLAIR"], study.study_instance_uid)


@pytest.mark.parametrize("compressor", sorted(COMPRESSORS))
def test_a_losslessly_compressed_study_gives_the_same_seg(
    world: World, uncompressed_seg: np.ndarray, compressor: str
) -> None:
    program = require_program(compressor)
    study = world.study(f"sent-{compressor}")
    compressed = []
    for path in study.files["FLAIR"]:
        out = world.tmp / compressor / path.name
        out.parent.mkdir(exist_ok=True)
        done = run_tool([program, str(path), str(out)])
        assert done.returncode == 0, done.stdout + done.stderr
        compressed.append(out)
    syntax, propose = COMPRESSORS[compressor]
    assert str(pydicom.dcmread(compressed[0]).file_meta.TransferSyntaxUID) == syntax
    assert readable_transfer_syntaxes((syntax,)) == (syntax,)
    seg = _seg_of(world, compressed, study.study_instance_uid, propose)
    assert uncompressed_seg.any()
    np.testing.assert_array_equal(seg, uncompressed_seg)


def test_an_mr_class_proposed_only_in_an_unreadable_syntax_is_refused_and_logged(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    assert readable_transfer_syntaxes((JPEG_XL_LOSSLESS,)) == ()
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage, [JPEG_XL_LOSSLESS])
    with caplog.at_level(logging.WARNING, logger="node.scp"):
        assoc = reactor.associate(ae, "127.0.0.1", world.port, "SEGNODE")
        assert assoc.is_established
        try:
            accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
        finally:
            assoc.release()
    assert accepted == {str(Verification)}
    messages = [r.getMessage() for r in caplog.records if r.name == "node.scp"]
    assert any("MR Image Storage refused" in m and "JPEG XL Lossless" in m for m in messages), messages
