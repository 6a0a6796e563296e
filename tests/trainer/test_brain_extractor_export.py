"""segnode export-brain-extractor: deepbet's networks to OpenVINO IR, checked against the originals on
real images, written as a model directory the registry imports."""

from __future__ import annotations

from pathlib import Path

import pytest

from db.card import read_model_dir

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

pytest.importorskip("deepbet", reason="deepbet is in the train extra")
pytest.importorskip("torch", reason="torch is in the train extra")


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "dicom").is_dir(), reason=f"no shared data at {DATA}")
def test_export_checks_the_ir_against_the_original(tmp_path: Path) -> None:
    """The export on a data folder of one series with skull (the smallest, so that the test stays short:
    torch runs deepbet on each image) and one BraTS case: the IR agrees with deepbet on each image, and
    the tumour stays inside the mask. The shipped IR's card holds the same check on every series."""
    from trainer.brain_extractor_export import export_brain_extractor

    series = min((p for p in (DATA / "dicom").iterdir() if p.is_dir()), key=_size)
    brats = sorted(p for p in (DATA / "train" / "brats").iterdir() if p.is_dir())[0]
    data = tmp_path / "data"
    (data / "dicom").mkdir(parents=True)
    (data / "dicom" / series.name).symlink_to(series)
    (data / "train").symlink_to(DATA / "train")
    out = tmp_path / "brain_extraction"
    card = export_brain_extractor(out, data, brats_limit=1)  # the first case (--brats-limit)
    model_dir = read_model_dir(out)  # every file present with the card's sha256
    assert model_dir.task == "brain_extraction"
    assert [a.key for a in model_dir.artifacts] == ["ir_fp32"]
    metrics = card["artifacts"][0]["metrics"]
    assert metrics["cases"] == [series.name, f"{brats.name}_flair", f"{brats.name}_t1"]
    for row in metrics["per_case"]:
        assert row["dice"] >= 0.99, row
        assert row["mean_abs_prob_diff"] < 0.005, row
        # the brain network's instance norms exact (converters/staged_network.py): run whole by
        # OpenVINO, float32 statistics put single voxels up to 0.5 away on this case's FLAIR
        assert row["network_max_abs_diff"] < 0.15, row
    assert metrics["mean"]["min_tumour_inside"] >= 0.995
    notice = (out / "NOTICE").read_text()
    assert "MIT License" in notice and "doi:10.1016/j.compbiomed.2024.108845" in notice


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def test_missing_deepbet_version_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from trainer import brain_extractor_export as export
    from trainer.exceptions import TrainerError

    monkeypatch.setattr(export, "VERSION", "0.0.1")
    expected = r"deepbet 1\.0\.2 is installed; this export is for deepbet 0\.0\.1"
    with pytest.raises(TrainerError, match=expected):
        export.deepbet_files()
    assert importlib.metadata.version("deepbet") == "1.0.2"


def test_data_without_check_images_fails_before_exporting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --data folder with no dicom/ series and no train/brats/ case (e.g. the shared data's train/)
    used to export both IRs and then fail with ``max() arg is an empty sequence``, leaving a card
    with no metrics and no NOTICE."""
    from trainer import brain_extractor_export as export
    from trainer.exceptions import TrainerError

    def no_export(*_: object) -> None:
        raise AssertionError("exported before --data was checked")

    monkeypatch.setattr(export, "export_ir", no_export)
    data = tmp_path / "train"
    (data / "brats2013_flair_t1c" / "brats_2013_pat0001_1").mkdir(parents=True)
    out = tmp_path / "brain_extraction"
    with pytest.raises(TrainerError, match=rf"--data {data} holds no image to check the IR on"):
        export.export_brain_extractor(out, data)
    assert not (out / "model.json").exists()
