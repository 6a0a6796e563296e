"""``[inference] views`` (node/segmenter.py, converters/prediction.py): the shipped model on a real
validation case, a card that keeps one view, and a served node over a socket (node.toml to the
segmenter: tests/node/test_mirror.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from converters.case import Case
from db.card import load_card
from node.bootstrap import SHIPPED_MODEL_DIR
from node.cli.commands import inference_text
from node.segmenter import OpenVINOSegmenter
from tests.helpers.node import make_threshold_model
from tests.helpers.regions import brats_case
from trainer.metrics import dice


def test_a_card_whose_grid_is_not_isotropic_keeps_one_view(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = make_threshold_model(tmp_path / "m", crop=(32, 32), spacing=(1.0, 1.0, 3.0))
    with caplog.at_level(logging.WARNING, logger="node.segmenter"):
        segmenter = OpenVINOSegmenter(load_card(model_dir), model_dir / "model_fp32.xml", views=3)
    assert segmenter.views == 1
    assert "or its input has context slices (0): slices along its slice axis only" in caplog.text
    with pytest.raises(ValueError, match="views 2 must be 1 or 3"):
        OpenVINOSegmenter(load_card(model_dir), model_dir / "model_fp32.xml", views=2)



def test_a_card_trained_on_three_axes_gets_three_views_whatever_the_node_says(tmp_path: Path) -> None:
    """``preprocessing.views`` 3 (segnode train --slice-axes 0,1,2): the node runs it so without
    ``three_views``; a model rolled back to one without it gets one view again."""
    model_dir = make_threshold_model(tmp_path / "m", crop=(32, 32))
    card = load_card(model_dir)
    three = {**card, "preprocessing": {**card["preprocessing"], "views": 3}}
    assert OpenVINOSegmenter(three, model_dir / "model_fp32.xml", views=1).views == 3
    assert OpenVINOSegmenter(card, model_dir / "model_fp32.xml", views=1).views == 1


@pytest.fixture(scope="module")
def validation_case() -> Case:
    """A validation case of models/default's split (never trained on), its whole volume."""
    return brats_case("BraTS2021_00005")


def test_shipped_model_along_three_axes_on_a_validation_case(validation_case: Case) -> None:
    """The real INT8 model: three views give another segmentation than one, closer to the label
    (docs/holdout_eval/views-2026-12-06.md: 0.9492 -> 0.9606 on this case)."""
    card, xml = load_card(SHIPPED_MODEL_DIR), SHIPPED_MODEL_DIR / "model_int8.xml"
    assert validation_case.label is not None
    truth = validation_case.label > 0
    scores = {}
    labels = {}
    for views in (1, 3):
        segmenter = OpenVINOSegmenter(card, xml, views=views)
        labels[views] = segmenter.segment({"FLAIR": validation_case.images["FLAIR"]}, validation_case.affine)
        scores[views] = dice(labels[views] > 0, truth)
    assert (labels[1] != labels[3]).sum() > 1000
    assert scores[3] > scores[1] > 0.9, scores


def test_jobs_show_words_the_views_and_mirror_a_job_ran_with() -> None:
    assert inference_text({"mirror": "none", "views": 3}) == "sagittal, coronal and axial slices averaged"
    assert inference_text({"mirror": "lr", "views": 1}) == (
        "slices along the model card's slice axis only, mirror images (lr) averaged"
    )


def test_a_served_node_with_three_views_sends_a_seg_over_a_socket(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/holdout_node.py's in-process node with three views: the validation case written as
    5 mm axial DICOM, sent by C-STORE; the SEG comes back and scores, and the job records the views,
    which ``segnode jobs show`` says."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import holdout_node

    from converters.nifti import list_cases
    from tests.helpers.peers import require_shared

    [ref] = list_cases(require_shared("train", "brats", "BraTS2021_00005"), require_labels=True)
    from tests.helpers.cli import run_cli

    with holdout_node.serving(SHIPPED_MODEL_DIR, "int8", views=3) as (node, receiver, workdir):
        sent = holdout_node.send_and_read(node, receiver, ref.load(), "axial_5mm", workdir)
        assert not isinstance(sent, str), sent
        monkeypatch.setenv("SEGNODE_DATABASE_URL", node.settings.database.url)
        monkeypatch.setenv("COLUMNS", "400")
        code, out, err = run_cli(["jobs", "show", str(sent.job.id)], capsys, monkeypatch)
    assert code == 0, err
    [row] = [line for line in out.splitlines() if "inference" in line and "averaged" in line]
    assert "sagittal, coronal and axial slices averaged" in row, out
    assert sent.job.result["inference"] == {"mirror": "none", "views": 3}
    assert dice(sent.predicted, sent.truth) > 0.9
    assert np.count_nonzero(sent.predicted) > 0
