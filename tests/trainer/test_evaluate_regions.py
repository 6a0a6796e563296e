"""``segnode evaluate`` of a brats_regions model: per-region Dice, HD95 and volume error, JSON and table.

The model is a stand-in whose output is known without running it (every voxel background, or the
true label map itself), so each figure is known by construction from the label files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from converters.nifti import list_cases
from converters.synthetic import write_synthetic_task01
from db.card import TASK_LABELS, load_card, write_card
from tests.helpers.cli import render, rich_tables, run_cli
from trainer import evaluate as ev
from trainer.metrics import BRATS_REGIONS, case_metrics

CARD: dict[str, Any] = {
    "name": "stand-in",
    "version": "0",
    "task": "brats_regions",
    "modalities": ["FLAIR", "T1", "T1GD", "T2"],
    "preprocessing": {"orientation": "RAS", "spacing_mm": [4.0, 4.0, 4.0], "crop_size": [48, 48]},
    "output": {"activation": "softmax"},
    "labels": TASK_LABELS["brats_regions"],
}


def _background(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    logits = np.zeros((batch.shape[0], 4, *batch.shape[2:]), np.float32)
    logits[:, 0] = 1.0
    return logits


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("regions") / "cases"
    return write_synthetic_task01(folder, 2, seed=7, shape=(40, 40, 16))


def test_evaluate_reports_each_region_per_case_and_mean(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stand_in = ev.CardPredictor(CARD, _background, "background stand-in", "fp32")
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: stand_in)
    monkeypatch.setenv("COLUMNS", "200")  # the table's cells on one line each
    out_json = tmp_path / "r.json"
    args = ["evaluate", "x.xml", "--data", str(data), "--json", str(out_json)]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert set(result["regions"]) == {"WT", "TC", "ET"}
    cases = list_cases(data, require_labels=True)
    for region, labels in BRATS_REGIONS.items():
        block = result["regions"][region]
        true_ml = []
        for ref, row in zip(cases, block["cases"], strict=True):
            case = ref.load()
            assert case.label is not None
            ml = int(np.isin(case.label, labels).sum()) * float(np.prod(case.spacing)) / 1000.0
            assert ml > 0, "every phantom has every region"
            true_ml.append(ml)
            assert row["case"] == ref.case_id
            assert row["dice"] == 0.0 and row["pred_volume_ml"] == 0.0
            assert row["true_volume_ml"] == pytest.approx(ml)
            assert row["volume_error_ml"] == pytest.approx(-ml)
            assert row["volume_error_rel"] == pytest.approx(-1.0)
        assert block["mean"]["volume_error_ml"] == pytest.approx(-np.mean(true_ml))
        assert block["mean"]["abs_volume_error_rel"] == pytest.approx(1.0)
    assert result["cases"][0]["volume_error_ml"] == result["regions"]["WT"]["cases"][0]["volume_error_ml"]
    assert "regions" in out and "err mL" in out
    assert all(ref.case_id in out for ref in cases)
    assert out.count("-100.0") == 9  # three regions of two cases and their means


def test_card_metrics_keep_each_region_per_case(data: Path) -> None:
    refs = list_cases(data, require_labels=True)
    per_case = []
    for ref in refs:  # a perfect prediction: the label map scored against itself
        case = ref.load()
        assert case.label is not None
        scores = case_metrics(case.label, case.label, case.spacing, "brats_regions")
        per_case.append({"case": ref.case_id, **scores})
    result = ev.report(ev.CardPredictor(CARD, _background, "perfect", "int8"), per_case)
    metrics = ev.card_metrics(result, "validation")
    assert set(metrics["regions_per_case"]) == {"WT", "TC", "ET"}
    for rows in metrics["regions_per_case"].values():
        assert [r["case"] for r in rows] == [r.case_id for r in refs]
        assert all(r["dice"] == 1.0 and r["volume_error_ml"] == 0.0 for r in rows)
        assert all(r["volume_error_rel"] == 0.0 for r in rows)
    assert metrics["regions"]["ET"]["dice"] == 1.0 and metrics["regions"]["ET"]["abs_volume_error_ml"] == 0.0


def test_region_table_mean_row_shows_absolute_volume_errors_beside_the_bias() -> None:
    """Over- and under-segmentation cancel in the mean signed error: the mean row also shows the mean
    absolute error (mL and %), which is what a reader wants to know of a model's volumes."""
    from trainer.cli import region_table
    from trainer.metrics import mean_metrics

    def case(name: str, pred: float, true: float) -> dict[str, Any]:
        err, rel = pred - true, (pred - true) / true
        return {"case": name, "dice": 0.8, "hd95": 5.0, "pred_volume_ml": pred, "true_volume_ml": true,
                "volume_error_ml": err, "abs_volume_error_ml": abs(err),
                "volume_error_rel": rel, "abs_volume_error_rel": abs(rel)}

    cases = [case("over", 120.0, 100.0), case("under", 30.0, 50.0)]
    [rows] = rich_tables(render(region_table({"WT": {"cases": cases, "mean": mean_metrics(cases)}}, "x")))
    over, under, mean = rows
    assert (over["case"], under["case"], mean["case"]) == ("over", "under", "mean")
    assert over["|err| mL"] == "20.0" and under["err %"] == "-40.0" and under["|err| %"] == "40.0"
    assert (mean["err mL"], mean["|err| mL"]) == ("+0.0", "20.0")
    assert (mean["err %"], mean["|err| %"]) == ("-10.0", "30.0")


def test_evaluate_record_in_a_model_directory_keeps_each_region(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``segnode evaluate MODEL_DIR --record`` writes to model.json the entry a model id's evaluation
    gets in the model table: the per-region means and per-case figures included."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    write_card({"format_version": 1, **CARD, "artifacts": []}, model_dir)
    stand_in = ev.CardPredictor(CARD, _background, "background stand-in", "int8")
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: stand_in)
    out_json = tmp_path / "r.json"
    args = ["evaluate", str(model_dir), "--data", str(data), "--json", str(out_json), "--record", "site-b"]
    monkeypatch.setenv("COLUMNS", "400")  # the path on one line, however long the tmp path is
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert f"recorded the site-b evaluation in {model_dir / 'model.json'}" in " ".join(out.split())
    result = json.loads(out_json.read_text())
    [entry] = load_card(model_dir)["evaluations"]
    assert entry == {**ev.card_metrics(result, "site-b"), "data": str(data.resolve()), "precision": "int8"}
    assert entry["regions"]["ET"] == result["regions"]["ET"]["mean"]
    wt = entry["regions_per_case"]["WT"]
    assert [r["case"] for r in wt] == [c["case"] for c in result["cases"]]
    assert [r["volume_error_ml"] for r in wt] == [c["volume_error_ml"] for c in result["cases"]]
