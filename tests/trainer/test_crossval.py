"""Cross-validation: folds of the patient-level split, and ``segnode crossval`` scoring each fold's model
on the cases it validated on (real OpenVINO IRs, real cases); no torch here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converters.synthetic import write_synthetic_task01
from tests.helpers.cli import run_cli
from tests.helpers.node import make_threshold_model
from trainer.data import split_by_completeness, split_cases
from trainer.evaluate import evaluate_cases, load_model, pool_folds
from trainer.exceptions import TrainerError


def test_folds_validate_every_patient_once_and_keep_a_patients_cases_together() -> None:
    ids = [f"case_{i}" for i in range(9)] + ["BraTS19_CBICA_ASK_1", "BraTS19_CBICA_ASK_2"]  # 10 patients
    splits = [split_cases(ids, 0.2, seed=4, folds=3, fold=f) for f in range(3)]
    vals = [s["val"] for s in splits]
    assert sorted(c for v in vals for c in v) == sorted(ids)  # each case validates exactly once
    for split in splits:
        assert sorted(split["train"] + split["val"]) == sorted(ids)
        assert not set(split["train"]) & set(split["val"])
        assert (split["folds"], split["seed"]) == (3, 4)
        together = {"BraTS19_CBICA_ASK_1", "BraTS19_CBICA_ASK_2"}
        assert together <= set(split["val"]) or together <= set(split["train"])
    patients = [len({c.rsplit("_", 1)[0] if c.startswith("BraTS") else c for c in v}) for v in vals]
    assert sorted(patients) == [3, 3, 4]  # 10 patients in three nearly equal parts
    assert [s["fold"] for s in splits] == [0, 1, 2]
    # the same seed gives the same folds; another seed other ones
    assert split_cases(ids, 0.2, seed=4, folds=3, fold=1) == splits[1]
    assert [split_cases(ids, 0.2, seed=5, folds=3, fold=f)["val"] for f in range(3)] != vals
    # without folds the split is what it always was (no folds keys)
    assert "folds" not in split_cases(ids, 0.2, seed=4)
    for folds, fold, message in ((3, 3, "fold 3 must be 0 to 2"),
                                 (11, 0, "10 patients cannot be cut into 11")):
        with pytest.raises(TrainerError, match=message):
            split_cases(ids, 0.2, seed=4, folds=folds, fold=fold)


@pytest.mark.parametrize(("patients", "folds"), [(8, 4), (15, 5)])
def test_fold_0_is_the_split_that_the_validation_fraction_gives(patients: int, folds: int) -> None:
    # trainer/README.md: the models trained with --val-fraction 0.2 and seed 0 (8 four-sequence cases,
    # 15 FLAIR cases) are fold 0 of their recipe, so their cross-validation needs folds 1 to K-1 only.
    ids = [f"case_{i:02d}" for i in range(patients)]
    assert split_cases(ids, 0.2, seed=0, folds=folds, fold=0)["val"] == split_cases(ids, 0.2, seed=0)["val"]


def test_folds_validate_only_on_cases_with_every_modality() -> None:
    four = ["FLAIR", "T1", "T1GD", "T2"]
    held = {f"full_{i}": four for i in range(4)} | {f"flair_{i}": ["FLAIR"] for i in range(3)}
    optional = ["T1", "T1GD", "T2"]
    splits = [split_by_completeness(held, four, optional, 0.2, 0, folds=2, fold=f) for f in (0, 1)]
    assert sorted(splits[0]["val"] + splits[1]["val"]) == [f"full_{i}" for i in range(4)]
    for split in splits:
        assert all(f"flair_{i}" in split["train"] for i in range(3))


def test_train_config_checks_folds() -> None:
    from trainer.train import TrainConfig

    for kw, message in (({"folds": 1}, "--folds 1 must be 0"), ({"fold": 1}, "--fold 1 needs --folds"),
                        ({"folds": 3, "fold": 3}, "--fold 3 must be 0 to 2")):
        with pytest.raises(TrainerError, match=message):
            TrainConfig(data="d", out="o", crop_size=[48, 48], depth=3, **kw).check()  # type: ignore[arg-type]
    TrainConfig(data="d", out="o", crop_size=[48, 48], depth=3, folds=3, fold=2).check()


def _fold_model(out: Path, threshold: float, train: list[str], val: list[str]) -> Path:
    """A real threshold IR whose card says its run validated on ``val`` (as segnode export writes it)."""
    model = make_threshold_model(out, crop=(64, 64), threshold=threshold)
    card = json.loads((model / "model.json").read_text())
    fold = int(out.name[-1])
    card["training"] = {"split": {"train": train, "val": val, "seed": 0, "folds": 2, "fold": fold}}
    (model / "model.json").write_text(json.dumps(card))
    return model


def test_crossval_scores_each_case_by_the_fold_that_validated_on_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_synthetic_task01(tmp_path / "Task01_BrainTumour", 4, seed=3, shape=(48, 48, 16))
    first, second = ["BRATS_001", "BRATS_002"], ["BRATS_003", "BRATS_004"]
    fold0 = _fold_model(tmp_path / "fold0", 1.0, second, first)
    fold1 = _fold_model(tmp_path / "fold1", 2.0, first, second)  # another threshold: other figures
    out = tmp_path / "cv.json"
    args = ["crossval", str(fold0), str(fold1), "--data", str(data), "--precision", "fp32"]
    args += ["--json", str(out)]
    code, stdout, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert "cross-validation, 2 folds" in stdout and "BRATS_003 (fold1)" in stdout
    result = json.loads(out.read_text())
    assert [(c["case"], c["fold"]) for c in result["cases"]] == [
        ("BRATS_001", "fold0"), ("BRATS_002", "fold0"), ("BRATS_003", "fold1"), ("BRATS_004", "fold1")
    ]
    assert result["mean"]["dice"] == pytest.approx(np.mean([c["dice"] for c in result["cases"]]))
    # each case's figures are those of its own fold's model, not the other's
    from converters.nifti import list_cases

    refs = {r.case_id: r for r in list_cases(data, require_labels=True)}
    for model, ids in ((fold0, first), (fold1, second)):
        alone = evaluate_cases(load_model(model, "fp32"), [refs[c] for c in ids])
        assert [c["dice"] for c in alone["cases"]] == [c["dice"] for c in result["cases"] if c["case"] in ids]
    other = evaluate_cases(load_model(fold1, "fp32"), [refs["BRATS_001"]])["cases"][0]["dice"]
    assert other != result["cases"][0]["dice"]

    # folds in directories of one name (runs/f0/export, runs/f1/export) go by their paths
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    same = [fold0.rename(tmp_path / "a" / "export"), fold1.rename(tmp_path / "b" / "export")]
    args = ["crossval", *map(str, same), "--data", str(data), "--precision", "fp32", "--json", str(out)]
    assert run_cli(args, capsys, monkeypatch)[0] == 0
    assert json.loads(out.read_text())["folds"] == [str(p) for p in same]
    fold0, fold1 = same

    # folds whose validation cases overlap, and a model directory without a split: one line, exit 2
    code, _, err = run_cli(["crossval", str(fold0), str(fold0), "--data", str(data), "--precision", "fp32"],
                           capsys, monkeypatch)
    assert code == 2 and "case BRATS_001 was validated by two folds" in err and "Traceback" not in err
    plain = make_threshold_model(tmp_path / "plain", crop=(64, 64))
    code, _, err = run_cli(["crossval", str(fold0), str(plain), "--data", str(data), "--precision", "fp32"],
                           capsys, monkeypatch)
    assert code == 2 and "names no validation case (training.split.val)" in err
    elsewhere = tmp_path / "other" / "Task01_BrainTumour"
    write_synthetic_task01(elsewhere, 1, seed=4, shape=(48, 48, 16))
    code, _, err = run_cli(["crossval", str(fold1), "--data", str(elsewhere), "--precision", "fp32"],
                           capsys, monkeypatch)
    assert code == 2 and "validated on BRATS_003, BRATS_004, not found under" in err


def test_pool_folds_refuses_folds_of_different_tasks() -> None:
    one = {"model": "a", "precision": "int8", "task": "whole_tumor", "cases": [{"case": "x", "dice": 0.5}]}
    two = {**one, "model": "b", "task": "brats_regions", "cases": [{"case": "y", "dice": 0.7}]}
    with pytest.raises(TrainerError, match="the folds differ in task"):
        pool_folds([one, two], ["a", "b"])
    pooled = pool_folds([one, {**two, "task": "whole_tumor"}], ["a", "b"])
    assert pooled["mean"]["dice"] == pytest.approx(0.6) and pooled["folds"] == ["a", "b"]
