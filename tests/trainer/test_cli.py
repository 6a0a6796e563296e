"""``segnode evaluate`` of a registered model id: a real OpenVINO IR, a real database, labelled cases.

No torch here: an IR needs only the base install.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from converters.synthetic import write_synthetic_task01
from db.registry import open_registry
from tests.helpers.cli import rich_tables, run_cli
from tests.helpers.node import make_threshold_model


@pytest.fixture()
def registered(tmp_path: Path, segnode_home: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, Path, Path]:
    """(model id, model directory, labelled cases): a threshold IR imported into a fresh database."""
    url = f"sqlite:///{tmp_path / 'models.db'}"
    monkeypatch.setenv("SEGNODE_DATABASE_URL", url)
    model_dir = make_threshold_model(tmp_path / "model", crop=(64, 64), threshold=1.0)
    registry = open_registry(url)
    [info] = registry.import_dir(model_dir, by="test")
    registry.close()
    data = write_synthetic_task01(tmp_path / "site_b", 2, seed=3, shape=(48, 48, 16))
    return info.id, model_dir, data


def test_evaluate_a_model_id_records_the_result_in_the_model_table(
    registered: tuple[int, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model_id, model_dir, data = registered
    by_id = tmp_path / "by_id.json"
    args = ["evaluate", str(model_id), "--data", str(data), "--json", str(by_id), "--by", "eve"]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert f"recorded the {data.name} evaluation of model #{model_id} in the model table" in out
    result = json.loads(by_id.read_text())
    assert [c["case"] for c in result["cases"]] == ["BRATS_001", "BRATS_002"]
    assert result["precision"] == "fp32" and result["model"].startswith(f"model #{model_id} ")

    # the same files opened as a model directory give the same figures
    by_dir = tmp_path / "by_dir.json"
    args = ["evaluate", str(model_dir), "--data", str(data), "--precision", "fp32", "--json", str(by_dir)]
    assert run_cli(args, capsys, monkeypatch)[0] == 0
    dice = [c["dice"] for c in result["cases"]]
    assert [c["dice"] for c in json.loads(by_dir.read_text())["cases"]] == dice
    assert all(d > 0.1 for d in dice), "the threshold model finds the phantom tumours"

    code, out, _ = run_cli(["models", "show", str(model_id), "--json"], capsys, monkeypatch)
    metrics = json.loads(out)["metrics"]
    [entry] = metrics["evaluations"]
    assert (entry["split"], entry["data"], entry["by"], entry["precision"]) == (
        data.name,
        str(data.resolve()),
        "eve",
        "fp32",
    )
    assert entry["cases"] == ["BRATS_001", "BRATS_002"] and entry["mean"] == result["mean"]
    assert metrics["mean"]["dice"] == 0.8, "the promotion gates' metrics are left alone"

    # again under a split name: a second entry; the same split again replaces it
    for _ in range(2):
        args = ["evaluate", str(model_id), "--data", str(data), "--record", "site-b"]
        assert run_cli(args, capsys, monkeypatch)[0] == 0
    code, out, _ = run_cli(["models", "show", str(model_id), "--json"], capsys, monkeypatch)
    assert [e["split"] for e in json.loads(out)["metrics"]["evaluations"]] == [data.name, "site-b"]
    monkeypatch.setenv("COLUMNS", "200")  # tables not cut by the terminal's width
    code, out, _ = run_cli(["models", "show", str(model_id)], capsys, monkeypatch)
    assert code == 0 and "Evaluations (segnode evaluate)" in out and "site-b" in out
    assert f"{result['mean']['dice']:.4f}" in out


def test_evaluate_unknown_or_tampered_model_id_is_one_line(
    registered: tuple[int, Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model_id, model_dir, data = registered
    code, _, err = run_cli(["evaluate", "99", "--data", str(data)], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert err.strip() == "error: model #99 does not exist (see `segnode models list`)"
    (model_dir / "model_fp32.bin").write_bytes(b"tampered")
    code, _, err = run_cli(["evaluate", str(model_id), "--data", str(data)], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: model #{model_id}: ") and "model_fp32.bin" in err


def test_evaluate_of_a_model_id_refuses_a_database_that_does_not_exist(
    tmp_path: Path, segnode_home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run away from the node, `segnode evaluate ID` created and migrated a database of its own, then
    said the model did not exist; it is refused as the models commands refuse it, nothing created."""
    missing = tmp_path / "elsewhere" / "segnode.db"
    missing.parent.mkdir()
    monkeypatch.setenv("SEGNODE_DATABASE_URL", f"sqlite:///{missing}")
    data = write_synthetic_task01(tmp_path / "site_b", 1, seed=3, shape=(48, 48, 16))
    code, _, err = run_cli(["evaluate", "1", "--data", str(data)], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"database sqlite:///{missing} does not exist" in err and "segnode db upgrade" in err, err
    assert not missing.exists()


def test_evaluate_of_a_whole_tumour_model_prints_the_volumes(
    registered: tuple[int, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The table shows what the JSON has of each case's tumour volume: predicted and true mL, the
    error signed and absolute in mL and %, and their means; HD95 in mm to two decimals."""
    _, model_dir, data = registered
    monkeypatch.setenv("COLUMNS", "250")  # the tables' cells on one line each
    out_json = tmp_path / "r.json"
    args = ["evaluate", str(model_dir), "--data", str(data), "--precision", "fp32", "--json", str(out_json)]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    metrics, volumes = rich_tables(out)
    assert [r["hd95 mm"] for r in metrics] == [f"{c['hd95']:.2f}" for c in [*result["cases"], result["mean"]]]
    assert [r["case"] for r in volumes] == [*(c["case"] for c in result["cases"]), "mean"]
    for row, c in zip(volumes, [*result["cases"], result["mean"]], strict=True):
        assert (row["pred mL"], row["true mL"]) == (
            f"{c['pred_volume_ml']:.1f}",
            f"{c['true_volume_ml']:.1f}",
        )
        assert (row["err mL"], row["|err| mL"]) == (
            f"{c['volume_error_ml']:+.1f}",
            f"{c['abs_volume_error_ml']:.1f}",
        )
        assert (row["err %"], row["|err| %"]) == (
            f"{100 * c['volume_error_rel']:+.1f}",
            f"{100 * c['abs_volume_error_rel']:.1f}",
        )
    assert float(volumes[-1]["|err| mL"]) > 0


def test_evaluate_accepts_holdout_data(
    registered: tuple[int, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Final evaluation is what the holdout is for: evaluate reads it, where training refuses it."""
    _, model_dir, data = registered
    holdout = tmp_path / "shared" / "holdout"
    holdout.parent.mkdir()
    holdout.symlink_to(data)
    out_json = tmp_path / "r.json"
    args = ["evaluate", str(model_dir), "--data", str(holdout), "--precision", "fp32"]
    args += ["--json", str(out_json)]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert [c["case"] for c in json.loads(out_json.read_text())["cases"]] == ["BRATS_001", "BRATS_002"]


def test_a_results_table_written_to_a_pipe_keeps_each_number_on_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rich lays out 80 columns when it writes to a pipe or file; a cross-validation table (its case
    column carries the fold's export path) then folded every number into a column of digits."""
    from db.cli import print_table
    from trainer.cli import case_table, console

    scores = {"dice": 0.825612, "jaccard": 0.70301, "sensitivity": 0.742312, "specificity": 0.999213,
              "hd95": 16.7312}
    case = "BraTS2021_00005 (runs/cross-validation/recipe-b/fold-0/export)"
    result = {"cases": [{"case": case, **scores}], "mean": scores}
    monkeypatch.delenv("COLUMNS", raising=False)
    print_table(case_table(result, "cross-validation, 4 folds, int8"), console)
    row = next(line for line in capsys.readouterr().out.splitlines() if "fold-0" in line)
    for number in ("0.8256", "0.7030", "0.7423", "0.9992", "16.73"):
        assert number in row

    monkeypatch.setenv("COLUMNS", "80")  # a width the user sets still rules
    print_table(case_table(result, "cross-validation, 4 folds, int8"), console)
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) <= 80
