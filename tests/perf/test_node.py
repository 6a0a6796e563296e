"""The node's performance changes keep their behaviour (issue 7): the static-batch OpenVINO segmenter
computes what the dynamic one does, and the SCP's associations poll at the configured delay."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from db.card import load_card
from node import reactor
from node.scp import MAX_PDU_BYTES
from node.segmenter import OpenVINOSegmenter
from node.service import NodeService
from tests.helpers.node import make_threshold_model, node_settings
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until


@pytest.fixture()
def threshold_model(tmp_path: Path) -> Path:
    return make_threshold_model(tmp_path / "model", crop=(64, 64))


@pytest.mark.parametrize("n", [1, 3, 8, 11, 16])
def test_static_batch_predicts_what_the_dynamic_model_does(threshold_model: Path, n: int) -> None:
    card = load_card(threshold_model)
    xml = next(threshold_model.glob("*.xml"))
    static = OpenVINOSegmenter(card, xml, batch_size=4)
    dynamic = OpenVINOSegmenter(card, xml, batch_size=4, static_batch=False)
    assert static.static_batch and not dynamic.static_batch
    slices = np.random.default_rng(n).standard_normal((n, 1, 64, 64)).astype(np.float32)
    got, want = static.predict(slices), dynamic.predict(slices)
    assert got.shape == want.shape == (n, 1, 64, 64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_static_batch_segments_a_volume_like_the_dynamic_model(threshold_model: Path) -> None:
    card = load_card(threshold_model)
    xml = next(threshold_model.glob("*.xml"))
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (64, 64, 21)).astype(np.float32) + 3.0
    image[20:30, 20:30, 5:15] += 6.0
    affine = np.eye(4)
    static = OpenVINOSegmenter(card, xml, batch_size=8).segment({"FLAIR": image}, affine)
    dynamic_model = OpenVINOSegmenter(card, xml, batch_size=16, static_batch=False)
    dynamic = dynamic_model.segment({"FLAIR": image}, affine)
    assert static.sum() > 0
    np.testing.assert_array_equal(static, dynamic)


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[NodeService]:
    service = NodeService(node_settings(tmp_path, free_port()))
    service.start()
    try:
        yield service
    finally:
        service.stop()


def test_open_associations_wait_on_their_socket_and_take_large_pdus(node: NodeService) -> None:
    ae = AE(ae_title="PERF_SCU")
    ae.add_requested_context(Verification)
    assoc = reactor.associate(ae, "127.0.0.1", node.scp.port, node.settings.node.ae_title)
    try:
        assert assoc.is_established
        accepted = wait_until(lambda: node.scp.ae.active_associations, 10, "the node's association")
        assert [a.dul._run_loop_delay for a in accepted] == [0]  # the DUL waits on its socket instead
        assert assoc.acceptor.maximum_length == MAX_PDU_BYTES  # what the node announced
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
