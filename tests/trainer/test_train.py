"""Training on small synthetic Task01 data: loss falls, run files, resume, two-process DDP, HPU, bad input."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers.cli import segnode_process
from tests.helpers.peers import REPO
from tests.helpers.training import tiny_config
from trainer.data import augment, epoch_plan, patient_key, split_cases
from trainer.exceptions import TrainerError

torch = pytest.importorskip("torch")

SHAPE = (48, 48, 24)


@pytest.fixture(scope="module")
def task01(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from converters.synthetic import write_synthetic_task01

    return write_synthetic_task01(
        tmp_path_factory.mktemp("task01") / "Task01_BrainTumour", 6, seed=5, shape=SHAPE
    )


def _config(data: Path, out: Path, **kw: object) -> object:
    return tiny_config(data, out, **{"epochs": 3, "val_fraction": 0.34, **kw})


def _metrics_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_patient_level_split_is_seeded_and_disjoint() -> None:
    ids = [
        "BraTS19_CBICA_ASK_1",
        "BraTS19_CBICA_ASK_2",
        "BraTS2021_00002",
        "BraTS2021_00005",
        "brats_2013_pat0001_1",
        "BraTS-GLI-00000-000",
        "BraTS-GLI-00000-001",
        "BRATS_001",
        "Brats18_TCIA01_131_1",  # BraTS 2017/2018 official names are spelt Brats17_/Brats18_
        "Brats18_TCIA01_131_2",
        "Brats17_CBICA_AAB_1",
    ]
    assert patient_key("BraTS19_CBICA_ASK_2") == "BraTS19_CBICA_ASK"
    assert patient_key("Brats18_TCIA01_131_1") == patient_key("Brats18_TCIA01_131_2") == "Brats18_TCIA01_131"
    assert patient_key("Brats17_CBICA_AAB_1") == "Brats17_CBICA_AAB"
    assert patient_key("BraTS-GLI-00000-001") == "BraTS-GLI-00000"
    assert patient_key("BraTS2021_00005") == "BraTS2021_00005"
    for seed in range(6):
        split = split_cases(ids, 0.34, seed)
        assert split == split_cases(ids, 0.34, seed)
        assert sorted(split["train"] + split["val"]) == sorted(ids)
        train_patients = {patient_key(c) for c in split["train"]}
        assert not train_patients & {patient_key(c) for c in split["val"]}
    with pytest.raises(TrainerError, match=r"validation fraction 1\.5"):
        split_cases(ids, 1.5, 0)


def test_oversampling_and_augmentation() -> None:
    tumour = np.zeros(1000, bool)
    tumour[:50] = True
    plan = epoch_plan(tumour, 4000, 0.5, seed=1, epoch=0)
    assert 0.45 < tumour[plan].mean() < 0.55
    assert not np.array_equal(plan, epoch_plan(tumour, 4000, 0.5, seed=1, epoch=1))
    image = np.zeros((1, 8, 8), np.float32)
    image[0, 2:5, 1:3] = 1.0
    target = (image[0] > 0).astype(np.uint8)
    for seed in range(8):
        aug_i, aug_t = augment(image, target, np.random.default_rng(seed))
        assert aug_i.shape == image.shape and aug_t.sum() == target.sum()
        np.testing.assert_array_equal(aug_i[0] != 0, aug_t > 0)  # image and label move together
        assert 0.85 < aug_i[aug_i != 0].mean() < 1.15


def test_tumour_fraction_one_samples_tumour_slices_only(tmp_path: Path) -> None:
    from trainer.train import TrainConfig

    tumour = np.zeros(1000, bool)
    tumour[:50] = True
    assert tumour[epoch_plan(tumour, 4000, 1.0, seed=1, epoch=0)].all()
    assert 0.03 < tumour[epoch_plan(tumour, 4000, 0.0, seed=1, epoch=0)].mean() < 0.07  # 0: uniform
    for bad in (1.5, -0.1):
        with pytest.raises(TrainerError, match=rf"--tumour-fraction {bad} must be a share in \[0, 1\]"):
            TrainConfig(data=str(tmp_path), out=str(tmp_path / "r"), tumour_fraction=bad).check()


def test_network_and_learning_rate_options_are_checked_before_preprocessing(tmp_path: Path) -> None:
    """Group norm splits each level's channels into min(8, channels) groups, so 12 base filters were
    a ValueError from torch after all preprocessing; a negative learning rate went through unchecked."""
    from trainer.train import TrainConfig

    def check(**kw: object) -> None:
        TrainConfig(data=str(tmp_path), out=str(tmp_path / "r"), **kw).check()  # type: ignore[arg-type]

    with pytest.raises(TrainerError, match=r"norm 'group' with 12 base filters: level 0 has 12 channels"):
        check(norm="group", base_filters=12)
    with pytest.raises(TrainerError, match=r"norm 'group' with 6 base filters: level 1 has 12 channels"):
        check(norm="group", base_filters=6)
    for ok in (4, 8, 24):
        check(norm="group", base_filters=ok)
    check(norm="batch", base_filters=12)
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(TrainerError, match=rf"--lr {bad} must be a positive number"):
            check(lr=bad)


def test_training_loss_falls_and_writes_the_run(task01: Path, tmp_path: Path) -> None:
    from trainer.checkpoint import load_checkpoint
    from trainer.train import train

    run = tmp_path / "run"
    summary = train(_config(task01, run), progress=False)  # type: ignore[arg-type]
    hist = summary["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert summary["best_dice"] > 0.3
    for name in ("run.json", "split.json", "last.pt", "best.pt", "learning_curves.png", "samples.png"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(_metrics_rows(run)) == 3
    split = json.loads((run / "split.json").read_text())
    assert len(split["val"]) == 2 and len(split["train"]) == 4
    state = load_checkpoint(run / "best.pt")
    assert state["model_class"] == "UNet2D" and state["run_state"]["best_epoch"] == summary["best_epoch"]
    assert state["card"]["preprocessing"]["spacing_mm"] == pytest.approx([4.0, 4.0, 6.25])


def test_cpu_training_runs_channels_last_and_its_checkpoint_loads_into_a_plain_network(
    task01: Path, tmp_path: Path
) -> None:
    """On the CPU the network trains in the channels-last layout (about 1.5x faster there,
    benchmarks/train_throughput.py); what it saves loads into a network in the default layout, as
    export and evaluation build it, and computes the same."""
    from trainer.checkpoint import load_checkpoint, model_from_checkpoint
    from trainer.train import train

    run = tmp_path / "run"
    train(_config(task01, run, epochs=1), progress=False)  # type: ignore[arg-type]
    state = load_checkpoint(run / "best.pt")
    convs = [v for v in state["model_state"].values() if v.ndim == 4 and v.shape[1] > 1 and v.shape[2] > 1]
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) for v in convs)
    assert not any(v.is_contiguous() for v in convs)
    plain = model_from_checkpoint(state).eval()
    assert all(p.is_contiguous() for p in plain.parameters())
    last = model_from_checkpoint(state).to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        out = last(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(out, plain(x), atol=1e-4, rtol=1e-4)


def test_resume_continues_from_the_saved_epoch(task01: Path, tmp_path: Path) -> None:
    from trainer.checkpoint import load_checkpoint
    from trainer.train import train

    run = tmp_path / "run"
    train(_config(task01, run, epochs=1), progress=False)  # type: ignore[arg-type]
    first = load_checkpoint(run / "last.pt")
    summary = train(_config(task01, run, epochs=2), resume=True, progress=False)  # type: ignore[arg-type]
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert summary["history"][0] == first["run_state"]["history"][0]
    assert [r["epoch"] for r in _metrics_rows(run)] == ["1", "2"]
    second = load_checkpoint(run / "last.pt")
    assert second["run_state"]["epoch"] == 2
    assert not torch.equal(first["model_state"]["head.weight"], second["model_state"]["head.weight"])
    with pytest.raises(TrainerError, match=r"--resume: option depth is 2 but the run .* used 3"):
        train(_config(task01, run, epochs=3, depth=2), resume=True, progress=False)  # type: ignore[arg-type]
    with pytest.raises(TrainerError, match=r"checkpoint .*nowhere.*last.pt does not exist"):
        train(_config(task01, tmp_path / "nowhere"), resume=True, progress=False)  # type: ignore[arg-type]
    # The grid and the data are the run's too: its card and lineage would otherwise name others.
    with pytest.raises(TrainerError, match=r"--resume: option spacing_mm is \[3.0, 3.0, 3.0\] but the run"):
        train(_config(task01, run, epochs=3, spacing_mm=[3.0, 3.0, 3.0]), resume=True, progress=False)  # type: ignore[arg-type]
    from converters.synthetic import write_synthetic_task01

    other = write_synthetic_task01(tmp_path / "other" / "Task01_BrainTumour", 6, seed=6, shape=SHAPE)
    with pytest.raises(TrainerError, match=r"--resume: the cases under .*other.* are not the ones the run"):
        train(_config(other, run, epochs=3), resume=True, progress=False)  # type: ignore[arg-type]


def test_a_fresh_run_into_a_run_dir_is_refused_unless_overwrite(
    task01: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forgetting --resume must not replace a run's checkpoints nor append a second run to its metrics;
    --overwrite removes the old run's files (and only those) before the new one writes."""
    from tests.helpers.cli import run_cli
    from trainer.train import train

    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "tensorboard" / "events.out.tfevents.1.old").write_bytes(b"old events")
    old = {"last.pt": b"old last", "best.pt": b"old best", "run.json": b"{}", "last.pt.tmp": b"partial"}
    old["metrics.csv"] = ("epoch,train_loss\n" + "".join(f"{e},0.5\n" for e in range(1, 7))).encode()
    for name, content in old.items():
        (run / name).write_bytes(content)
    (run / "notes.txt").write_text("the user's own file")
    args = ["train", "--data", str(task01), "--out", str(run), "--device", "cpu", "--epochs", "1"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--resume" in err and "--overwrite" in err
    assert {n: (run / n).read_bytes() for n in old} == old  # nothing touched
    assert sorted(p.name for p in (run / "tensorboard").iterdir()) == ["events.out.tfevents.1.old"]
    with pytest.raises(TrainerError, match="--resume and --overwrite exclude each other"):
        train(_config(task01, run, epochs=1), resume=True, overwrite=True, progress=False)  # type: ignore[arg-type]

    monkeypatch.chdir(task01.parent)  # --data as typed relative: run.json keeps it absolute for export
    args = ["train", "--data", task01.name, "--out", str(run), "--device", "cpu", "--epochs", "1"]
    small = ["--base-filters", "8", "--depth", "3", "--crop", "48", "--batch-size", "8", "--threads", "1"]
    small += ["--val-fraction", "0.34", "--slices-per-epoch", "16"]  # what is kept is at stake, not the net
    code, _, err = run_cli([*args, *small, "--overwrite"], capsys, monkeypatch)
    assert code == 0, err
    assert [r["epoch"] for r in _metrics_rows(run)] == ["1"]
    data = json.loads((run / "run.json").read_text())["config"]["data"]
    assert Path(data).is_absolute() and Path(data).resolve() == task01.resolve()
    events = list((run / "tensorboard").iterdir())
    assert len(events) == 1 and not events[0].name.endswith(".old")
    assert not (run / "last.pt.tmp").exists()
    assert json.loads((run / "run.json").read_text())["config"]["epochs"] == 1
    assert (run / "notes.txt").read_text() == "the user's own file"


def test_training_refuses_holdout_data(
    task01: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --data folder with a holdout/ folder in it (or under one) is refused before anything is read:
    its cases would train or choose the checkpoint, and the holdout is for final evaluation only."""
    from tests.helpers.cli import run_cli

    shared = tmp_path / "shared"
    (shared / "holdout").mkdir(parents=True)
    (shared / "holdout" / "Task01_BrainTumour").symlink_to(task01)
    (shared / "train").mkdir()
    for data in (shared, shared / "holdout" / "Task01_BrainTumour"):
        out = tmp_path / "run"
        args = ["train", "--data", str(data), "--out", str(out), "--device", "cpu", "--epochs", "1"]
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), err
        assert f"holdout data (under {shared / 'holdout'})" in err and "final evaluation only" in err
        assert not out.exists()


def test_an_unreadable_checkpoint_is_one_line_naming_the_file_and_what_to_do(
    task01: Path, tmp_path: Path
) -> None:
    """A damaged last.pt: --resume says which file, why in one short line, and the ways on (no fallback)."""
    from trainer.checkpoint import load_checkpoint, save_checkpoint
    from trainer.train import train

    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint({"model_state": {"w": torch.zeros(2000)}}, run / "best.pt")
    whole = (run / "best.pt").read_bytes()
    for damage in (whole[: len(whole) // 2], b"\x00" * 4096, b"not a checkpoint " * 64):
        (run / "last.pt").write_bytes(damage)
        with pytest.raises(TrainerError) as caught:
            train(_config(task01, run, epochs=1), resume=True, progress=False)  # type: ignore[arg-type]
        message = str(caught.value)
        # short but for the two paths, whose length is the tmp dir's
        assert "\n" not in message and len(message.replace(str(run), "RUN")) < 400, message
        assert message.startswith(f"--resume: the last checkpoint {run / 'last.pt'} cannot be read (")
        assert "--overwrite" in message and "--checkpoint best.pt" in message
        assert "False" not in message  # torch's advice to load with weights_only=False (runs its code)
        other = r"last\.pt cannot be read .*another checkpoint of the run \(best\.pt\)"
        with pytest.raises(TrainerError, match=other):
            load_checkpoint(run / "last.pt")
    assert (run / "best.pt").read_bytes() == whole
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt"]  # nothing written


def test_a_kill_between_the_two_checkpoint_writes_keeps_the_best_model(
    task01: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """best.pt is written before last.pt: killed between them, the run resumes from the previous
    last.pt and best.pt is never older than the best epoch last.pt records (the other order lost it)."""
    import trainer.train as train_module
    from trainer.checkpoint import load_checkpoint, save_checkpoint

    # every epoch improves, so every epoch writes both checkpoints
    monkeypatch.setattr(train_module.Trainer, "_validate", lambda self: 0.1 + 0.1 * self.state.epoch)
    writes: list[str] = []

    def dying_save(state: dict[str, object], path: Path) -> None:
        writes.append(path.name)
        if len(writes) == 4:  # epoch 2's second write
            raise KeyboardInterrupt("killed")
        save_checkpoint(state, path)

    monkeypatch.setattr(train_module, "save_checkpoint", dying_save)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_module.train(_config(task01, run, epochs=2), progress=False)  # type: ignore[arg-type]
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert best["run_state"]["best_epoch"] >= last["run_state"]["best_epoch"]
    assert writes == ["best.pt", "last.pt", "best.pt", "last.pt"]
    monkeypatch.setattr(train_module, "save_checkpoint", save_checkpoint)
    summary = train_module.train(_config(task01, run, epochs=2), resume=True, progress=False)  # type: ignore[arg-type]
    assert summary["best_epoch"] == 2 == load_checkpoint(run / "best.pt")["run_state"]["epoch"]


def test_min_epochs_keeps_no_earlier_epoch_and_holds_off_early_stopping(
    task01: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A noisy validation score peaking in the first epochs made patience keep an almost untrained
    network (a fold kept epoch 2 of 17). With --min-epochs N no epoch before N becomes best.pt and
    patience counts only from N."""
    import trainer.train as train_module
    from trainer.checkpoint import load_checkpoint

    scores = {1: 0.9, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.35, 6: 0.3}
    monkeypatch.setattr(train_module.Trainer, "_validate", lambda self: scores[self.state.epoch + 1])

    plain = train_module.train(_config(task01, tmp_path / "plain", epochs=6, patience=2), progress=False)  # type: ignore[arg-type]
    assert (plain["best_epoch"], plain["epoch"]) == (1, 3)  # epoch 1's peak, stopped two epochs later

    run = tmp_path / "min3"
    summary = train_module.train(_config(task01, run, epochs=6, patience=2, min_epochs=3), progress=False)  # type: ignore[arg-type]
    assert (summary["best_epoch"], summary["epoch"]) == (4, 6)  # 3 and 4 improve; stale 5 and 6
    assert load_checkpoint(run / "best.pt")["run_state"]["epoch"] == 4

    last = train_module.train(_config(task01, tmp_path / "last", epochs=4, min_epochs=4), progress=False)  # type: ignore[arg-type]
    assert last["best_epoch"] == 4 == last["epoch"]  # --min-epochs = --epochs: best.pt is the last epoch

    # the time cap ends a run before --min-epochs: no best.pt, and the log says what to do
    capped = tmp_path / "capped"
    with caplog.at_level(logging.WARNING, logger="trainer.train"):
        config = _config(task01, capped, epochs=4, min_epochs=3, max_minutes=1e-4)
        summary = train_module.train(config, progress=False)  # type: ignore[arg-type]
    assert (summary["epoch"], summary["best_epoch"]) == (1, -1)
    assert not (capped / "best.pt").exists() and (capped / "last.pt").is_file()
    assert "no best.pt: the run stopped after epoch 1, before --min-epochs 3" in caplog.text
    assert "--checkpoint last.pt" in caplog.text

    from trainer.train import TrainConfig

    for bad, message in (
        (0, r"min_epochs 0 must be at least 1"),
        (7, r"--min-epochs 7 must not exceed --epochs 6"),
    ):
        with pytest.raises(TrainerError, match=message):
            TrainConfig(data=str(tmp_path), out=str(tmp_path / "r"), epochs=6, min_epochs=bad).check()


def _segnode(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return segnode_process(*args, env={**os.environ, **(extra_env or {})})


def test_two_process_ddp_under_torchrun(task01: Path, tmp_path: Path) -> None:
    from trainer.checkpoint import load_checkpoint

    run = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "node",
        "train",
        "--data",
        str(task01),
        "--out",
        str(run),
        "--device",
        "cpu",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--base-filters",
        "8",
        "--depth",
        "3",
        "--crop",
        "48",
        "--val-fraction",
        "0.34",
        "--no-progress",
        "--lr",
        "0.003",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    state = load_checkpoint(run / "last.pt")
    assert state["device_count"] == 2 and state["run_state"]["epoch"] == 2
    assert len(_metrics_rows(run)) == 2  # rank 0 alone wrote
    assert state["run_state"]["best_dice"] > 0


def test_hpu_trains_where_habana_is_installed(task01: Path, tmp_path: Path) -> None:
    from trainer.devices import habana_available

    if not habana_available():
        pytest.skip("habana_frameworks is not installed here: no Gaudi (HPU) to test on")
    from trainer.train import train

    summary = train(_config(task01, tmp_path / "hpu", device="hpu", epochs=1), progress=False)  # type: ignore[arg-type]
    assert summary["epoch"] == 1


def test_unavailable_device_is_a_clear_error(task01: Path, tmp_path: Path) -> None:
    from trainer.devices import resolve_device

    with pytest.raises(TrainerError, match="device 'tpu' is not one of auto, cpu, cuda, hpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainerError, match=r"device cuda: torch.cuda.is_available\(\) is False"):
            resolve_device("cuda")


def test_bad_input_fails_before_training_with_one_line(task01: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing here")
    done = _segnode("train", "--data", str(empty), "--out", str(tmp_path / "r1"), "--device", "cpu")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(empty) in lines[0]
    assert not (tmp_path / "r1" / "last.pt").exists()
    done = _segnode(
        "train", "--data", str(task01), "--out", str(tmp_path / "r2"), "--crop", "50", "--depth", "3"
    )
    assert done.returncode == 2
    assert "crop size [50, 50] must be two positive multiples of 2**depth = 8" in done.stderr
    args = ("--norm", "group", "--base-filters", "12")
    done = _segnode("train", "--data", str(task01), "--out", str(tmp_path / "r3"), *args)
    assert done.returncode == 2 and done.stderr.startswith("error:"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "12 base filters" in done.stderr


def test_corrupt_or_unlabelled_case_is_named_before_training(task01: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "Task01_BrainTumour"
    shutil.copytree(task01, data)
    label = sorted((data / "labelsTr").glob("*.nii.gz"))[2]
    label.write_bytes(b"this is not a NIfTI file")
    done = _segnode("train", "--data", str(data), "--out", str(tmp_path / "r"), "--device", "cpu")
    assert done.returncode == 2, done.stderr
    assert label.name in done.stderr and done.stderr.startswith("error:")
    assert not (tmp_path / "r" / "last.pt").exists()
    label.unlink()
    done = _segnode("train", "--data", str(data), "--out", str(tmp_path / "r"), "--device", "cpu")
    assert done.returncode == 2
    assert label.name.split(".")[0] in done.stderr and "label" in done.stderr.lower()


def test_brats_regions_trains_and_evaluates_per_region(task01: Path, tmp_path: Path) -> None:
    from converters.nifti import list_cases
    from trainer.evaluate import evaluate_cases, load_model
    from trainer.train import train

    run = tmp_path / "regions"
    config = _config(task01, run, epochs=1, task="brats_regions", modalities=["FLAIR", "T1", "T1GD", "T2"])
    train(config, progress=False)  # type: ignore[arg-type]
    loaded = load_model(run / "best.pt")
    assert loaded.card["output"] == {"activation": "softmax"} and len(loaded.card["labels"]) == 3
    result = evaluate_cases(loaded, list_cases(task01, require_labels=True)[:2])
    assert set(result["regions"]) == {"WT", "TC", "ET"}
    assert result["mean"]["dice"] == pytest.approx(result["regions"]["WT"]["mean"]["dice"])
    assert len(result["regions"]["ET"]["cases"]) == 2


def test_slices_along_three_axes_are_checked_trained_and_kept_on_resume(task01: Path, tmp_path: Path) -> None:
    """``--slice-axes 0,1,2``: every training case cut along the grid's three axes, only on an isotropic
    grid; a run trains and validates with them; a resumed run must keep the axes, and a run saved before
    the option existed counts as axial only."""
    from converters.nifti import list_cases
    from trainer.checkpoint import load_checkpoint, save_checkpoint
    from trainer.data import prepare_views
    from trainer.train import TrainConfig, card_base, train

    case = list_cases(task01, require_labels=True)[0].load()
    iso = [4.0, 4.0, 4.0]  # the synthetic cases' grid is 4 x 4 x 6.25 mm
    pre = card_base(_config(task01, tmp_path / "x"), iso)["preprocessing"]  # type: ignore[arg-type]
    views = prepare_views(case, pre, ["FLAIR"], "whole_tumor", slice_axes=[0, 1, 2])
    assert [v.prepared.slice_axis for v in views] == [0, 1, 2]
    assert [len(v.prepared.slices) for v in views] != [len(views[2].prepared.slices)] * 3
    assert [v.prepared.slices.shape[2:] for v in views] == [(48, 48)] * 3
    with pytest.raises(TrainerError, match=r"--slice-axes \[0, 2\] must be 2 or 0,1,2"):
        TrainConfig(data=str(tmp_path), out=str(tmp_path / "r"), slice_axes=[0, 2]).check()

    with pytest.raises(TrainerError, match=r"needs an isotropic grid, not spacing \[4.0, 4.0, 6.25\] mm"):
        train(_config(task01, tmp_path / "aniso", epochs=1, slice_axes=[0, 1, 2]), progress=False)  # type: ignore[arg-type]

    run = tmp_path / "run"

    def config(**kw: object) -> Any:
        return _config(task01, run, spacing_mm=iso, **kw)

    summary = train(config(epochs=1, slice_axes=[0, 1, 2]), progress=False)
    assert 0.0 <= summary["best_dice"] <= 1.0
    card = json.loads((run / "run.json").read_text())["card"]
    assert card["preprocessing"]["views"] == 3  # the node and the evaluation run it along three axes
    with pytest.raises(TrainerError, match=r"option slice_axes is \[2\] but the run .* used \[0, 1, 2\]"):
        train(config(epochs=2), resume=True, progress=False)
    # A checkpoint written before --slice-axes existed resumes as an axial run.
    saved = load_checkpoint(run / "last.pt")
    del saved["train_config"]["slice_axes"]
    save_checkpoint({k: v for k, v in saved.items() if k != "format"}, run / "last.pt")
    with pytest.raises(TrainerError, match=r"option slice_axes is \[0, 1, 2\] but the run .* used \[2\]"):
        train(config(epochs=2, slice_axes=[0, 1, 2]), resume=True, progress=False)


def test_context_slices_are_checked_trained_exported_and_run_by_the_node(
    task01: Path, tmp_path: Path
) -> None:
    """``--context-slices 1`` (2.5D): each slice goes in with its neighbours as channels; the card says
    so, the export's networks take three channels, and the node's segmenter stacks them alike."""
    pytest.importorskip("nncf")
    from converters.exceptions import ModelCardError
    from converters.nifti import list_cases
    from node.segmenter import OpenVINOSegmenter
    from trainer.export import ExportOptions, export_run
    from trainer.train import TrainConfig, train

    for bad, message in (({"context_slices": 4}, r"--context-slices 4 must be 0 to 3"),
                         ({"context_slices": 1, "slice_axes": [0, 1, 2]}, "needs slices along one axis")):
        with pytest.raises(TrainerError, match=message):
            TrainConfig(data=str(tmp_path), out=str(tmp_path / "r"), **bad).check()  # type: ignore[arg-type]

    run = tmp_path / "run"
    summary = train(_config(task01, run, epochs=1, context_slices=1), progress=False)  # type: ignore[arg-type]
    assert 0.0 <= summary["best_dice"] <= 1.0
    saved = json.loads((run / "run.json").read_text())
    assert saved["card"]["preprocessing"]["context_slices"] == 1
    assert saved["model_config"]["in_channels"] == 3
    with pytest.raises(TrainerError, match=r"option context_slices is 0 but the run .* used 1"):
        train(_config(task01, run, epochs=2), resume=True, progress=False)  # type: ignore[arg-type]

    card = export_run(ExportOptions(run_dir=run, calibration_size=20, register=False))
    assert card["preprocessing"]["context_slices"] == 1
    segmenter = OpenVINOSegmenter(card, run / "export" / "model_int8.xml", views=3)
    assert segmenter.views == 1  # its channels are neighbours along the card's slice axis
    case = list_cases(task01, require_labels=True)[0].load()
    labels = segmenter.segment(case.images, case.affine)
    assert labels.shape == case.images["FLAIR"].shape and set(np.unique(labels)) <= {0, 1}
    plain = dict(card, preprocessing={k: v for k, v in card["preprocessing"].items()
                                      if k != "context_slices"})
    with pytest.raises(ModelCardError, match="takes 3 channels but the card lists 1 modalities"):
        OpenVINOSegmenter(plain, run / "export" / "model_int8.xml")


def test_a_cross_validation_fold_trains_on_its_split_and_its_export_says_which(
    task01: Path, tmp_path: Path
) -> None:
    """``--folds 3 --fold 1``: the run validates on the second of three parts of the patients, resumes
    only as that fold, and its export's card names the cases ``segnode crossval`` scores it on."""
    pytest.importorskip("nncf")
    from converters.nifti import list_cases
    from trainer.data import split_cases
    from trainer.evaluate import fold_validation_cases
    from trainer.export import ExportOptions, export_run
    from trainer.train import train

    run = tmp_path / "fold1"
    train(_config(task01, run, epochs=1, folds=3, fold=1), progress=False)  # type: ignore[arg-type]
    split = json.loads((run / "split.json").read_text())
    ids = [r.case_id for r in list_cases(task01, require_labels=True)]
    expected = split_cases(ids, 0.34, seed=0, folds=3, fold=1)
    assert (split["val"], split["folds"], split["fold"]) == (expected["val"], 3, 1)
    assert len(split["val"]) == 2 and sorted(split["train"] + split["val"]) == sorted(ids)
    with pytest.raises(TrainerError, match=r"option fold is 0 but the run .* used 1"):
        train(_config(task01, run, epochs=2, folds=3, fold=0), resume=True, progress=False)  # type: ignore[arg-type]
    with pytest.raises(TrainerError, match=r"option split_seed is 4 but the run .* used None"):
        train(_config(task01, run, epochs=2, folds=3, fold=1, split_seed=4), resume=True, progress=False)  # type: ignore[arg-type]
    card = export_run(ExportOptions(run_dir=run, calibration_size=20, register=False))
    assert (card["training"]["split"]["folds"], card["training"]["split"]["fold"]) == (3, 1)
    assert fold_validation_cases(run / "export") == split["val"]
