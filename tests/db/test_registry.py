"""The registry API on SQLite and PostgreSQL: import, register, verify, promote gates, rollback, retire."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from db.exceptions import (
    ConcurrentPromotionError,
    DatabaseOperationError,
    DatabaseUnavailableError,
    InvalidArtifactError,
    InvalidModelDirectory,
    ModelNotFoundError,
    ModelRetiredError,
    PromotionRefused,
    RegistryError,
    RetireRefusedError,
    RollbackError,
)
from db.registry import Registry, open_registry
from db.session import make_engine, make_session_factory
from tests.conftest import write_model_dir

TASK = "whole_tumor"


@pytest.fixture()
def registry(migrated_db_url: str) -> Iterator[Registry]:
    reg = open_registry(migrated_db_url)
    yield reg
    reg.close()


def _import(registry: Registry, tmp_path: Path, version: str = "1.0.0", **kwargs: object) -> dict[str, int]:
    """Import a model directory; ids by key (onnx, ir_fp32, ir_int8)."""
    infos = registry.import_dir(write_model_dir(tmp_path / f"model-{version}", version=version, **kwargs))
    return {f"{i.kind}_{i.precision}" if i.kind == "ir" else i.kind: i.id for i in infos}


def _actions(registry: Registry) -> list[tuple[str, int | None, int | None]]:
    return [
        (e.action, e.from_model_id, e.to_model_id) for e in registry.history(TASK) if e.action != "register"
    ]


def test_import_registers_artifacts_with_lineage_checksums_and_card(
    registry: Registry, tmp_path: Path
) -> None:
    directory = write_model_dir(tmp_path / "m")
    infos = registry.import_dir(directory, by="alice")
    assert [(i.kind, i.precision) for i in infos] == [("onnx", "fp32"), ("ir", "fp32"), ("ir", "int8")]
    onnx, fp32, int8 = infos
    assert (onnx.parent_id, fp32.parent_id, int8.parent_id) == (None, onnx.id, fp32.id)
    assert all(i.status == "candidate" and i.task == TASK and i.modalities == ("FLAIR",) for i in infos)
    for info in infos:
        for f in info.files:
            assert f.path.is_absolute() and f.path.parent == directory.resolve()
            assert f.sha256 == hashlib.sha256(f.path.read_bytes()).hexdigest()
            assert f.size == f.path.stat().st_size
    assert [f.path.name for f in int8.files] == ["model_int8.xml", "model_int8.bin"]
    assert int8.file_with_suffix(".xml").name == "model_int8.xml"
    assert int8.dice == pytest.approx(0.895)
    assert int8.metrics is not None and int8.metrics["cases"] == ["case_001", "case_002", "case_003"]
    assert int8.calibration == {"subset_size": 300, "preset": "performance", "source": "training split"}
    assert int8.training is not None and int8.training["device_kind"] == "cpu"
    assert int8.card is not None and int8.card["preprocessing"]["crop_size"] == [192, 192]
    assert "artifacts" not in int8.card
    assert int8.created_at.tzinfo is not None
    assert registry.get(int8.id) == int8
    assert [m.id for m in registry.list_models(TASK)] == [onnx.id, fp32.id, int8.id]
    assert registry.list_models("brats_regions") == []
    events = registry.history(TASK)
    assert [(e.action, e.to_model_id, e.by) for e in events] == [("register", i.id, "alice") for i in infos]
    assert json.loads(json.dumps(int8.to_dict()))["files"][0]["path"] == str(int8.files[0].path)


def test_import_twice_is_idempotent_and_different_files_are_refused(
    registry: Registry, tmp_path: Path
) -> None:
    first = registry.import_dir(write_model_dir(tmp_path / "a"))
    again = registry.import_dir(tmp_path / "a")
    assert [i.id for i in again] == [i.id for i in first]
    assert len(registry.list_models()) == 3
    other = write_model_dir(tmp_path / "b", seed=7)  # same name and version, other bytes
    with pytest.raises(InvalidModelDirectory) as info:
        registry.import_dir(other)
    assert str(other / "model.json") in str(info.value)
    assert "already registered as model #" in str(info.value)
    assert len(registry.list_models()) == 3
    assert len(registry.history()) == 3


def test_register_computes_checksums_and_checks_fields(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "w.xml").write_bytes(b"<net/>")
    (tmp_path / "w.bin").write_bytes(bytes(range(256)))
    info = registry.register(
        name="n",
        version="2",
        task=TASK,
        modalities=["FLAIR", "T1"],
        kind="ir",
        precision="fp32",
        files=[Path("w.xml"), Path("w.bin")],
        base_dir=tmp_path,
        metrics={"cases": ["c"], "mean": {"dice": 0.8}},
    )
    assert info.files[1].path == (tmp_path / "w.bin").resolve()
    assert info.files[1].sha256 == hashlib.sha256(bytes(range(256))).hexdigest()
    assert info.size == 6 + 256
    child = registry.register(
        name="n",
        version="2",
        task=TASK,
        modalities=["FLAIR", "T1"],
        kind="ir",
        precision="int8",
        files=[tmp_path / "w.bin"],
        parent_id=info.id,
    )
    assert child.parent_id == info.id
    with pytest.raises(InvalidArtifactError, match=f"already registered as model #{info.id}"):
        registry.register(
            name="n",
            version="2",
            task=TASK,
            modalities=["FLAIR"],
            kind="ir",
            precision="fp32",
            files=[tmp_path / "w.bin"],
        )
    with pytest.raises(InvalidArtifactError, match="kind 'tflite' is not one of checkpoint, onnx, ir"):
        registry.register(
            name="n",
            version="3",
            task=TASK,
            modalities=["FLAIR"],
            kind="tflite",
            precision="fp32",
            files=[tmp_path / "w.bin"],
        )
    with pytest.raises(InvalidArtifactError, match=r"file .*nope\.bin does not exist"):
        registry.register(
            name="n",
            version="3",
            task=TASK,
            modalities=["FLAIR"],
            kind="ir",
            precision="fp32",
            files=[tmp_path / "nope.bin"],
        )
    with pytest.raises(InvalidArtifactError, match="parent_id 999 is not a registered model"):
        registry.register(
            name="n",
            version="3",
            task=TASK,
            modalities=["FLAIR"],
            kind="ir",
            precision="fp32",
            files=[tmp_path / "w.bin"],
            parent_id=999,
        )
    assert len(registry.list_models()) == 2


def test_out_of_range_ids_and_too_long_fields_are_refused_alike_on_both_backends(
    registry: Registry, tmp_path: Path
) -> None:
    """PostgreSQL refuses them with a DataError, SQLite would answer or store them: both are checked first."""
    big = 3_000_000_000  # beyond PostgreSQL's integer
    for call in (registry.get, registry.verify, registry.retire, registry.promote):
        with pytest.raises(ModelNotFoundError, match=f"model #{big} does not exist"):
            call(big)
    with pytest.raises(ModelNotFoundError, match=f"model #{big} does not exist"):
        registry.record_evaluation(big, {"split": "validation", "mean": {"dice": 0.9}})
    (tmp_path / "w.xml").write_bytes(b"<net/>")

    def register(
        name: str = "n", version: str = "1", parent_id: int | None = None, by: str | None = None
    ) -> None:
        registry.register(
            name=name,
            version=version,
            task=TASK,
            modalities=["FLAIR"],
            kind="ir",
            precision="fp32",
            files=[tmp_path / "w.xml"],
            parent_id=parent_id,
            by=by,
        )

    with pytest.raises(InvalidArtifactError, match=f"parent_id {big} is not a registered model"):
        register(parent_id=big)
    with pytest.raises(InvalidArtifactError, match="name is 201 characters long; at most 200"):
        register(name="n" * 201)
    with pytest.raises(InvalidArtifactError, match="version is 101 characters long; at most 100"):
        register(version="1" * 101)
    with pytest.raises(RegistryError, match=r"--by 'xxx.*is 201 characters long; at most 200"):
        register(by="x" * 201)
    with pytest.raises(RegistryError, match=r"--by 'xxx.*is 201 characters long; at most 200"):
        registry.import_dir(write_model_dir(tmp_path / "m"), by="x" * 201)
    with pytest.raises(InvalidModelDirectory, match=r"name: 'nnn.*is 201 characters long; at most 200"):
        registry.import_dir(write_model_dir(tmp_path / "long", name="n" * 201))
    assert registry.list_models() == [] and registry.history() == []
    register(name="n" * 200, version="1" * 100, by="x" * 200)


def test_a_value_postgresql_refuses_is_a_one_line_registry_error(registry: Registry) -> None:
    """A DataError the checks before the database miss is still a RegistryError, not a traceback."""
    if registry._sessions.kw["bind"].dialect.name != "postgresql":
        pytest.skip("SQLite casts instead of refusing")
    with (
        pytest.raises(DatabaseOperationError, match=r"database error: DataError: .*integer") as info,
        registry._read() as session,
    ):
        session.execute(text("SELECT CAST('x' AS integer)"))
    assert "\n" not in str(info.value)


def test_verify_reports_ok_missing_and_mismatch(registry: Registry, tmp_path: Path) -> None:
    ids = _import(registry, tmp_path)
    report = registry.verify(ids["ir_fp32"])
    assert report.ok and [f.status for f in report.files] == ["ok", "ok"]
    xml, binary = (f.path for f in registry.get(ids["ir_fp32"]).files)
    binary.write_bytes(b"\0" + binary.read_bytes()[1:])  # same size, other bytes
    xml.unlink()
    report = registry.verify(ids["ir_fp32"])
    assert not report.ok
    assert [f.status for f in report.files] == ["missing", "mismatch"]
    assert report.problems[0] == f"{xml}: missing"
    assert report.problems[1].startswith(f"{binary}: sha256 ")
    with pytest.raises(ModelNotFoundError, match="model #424242 does not exist"):
        registry.verify(424242)


def test_promote_int8_within_tolerance_and_switch_models(registry: Registry, tmp_path: Path) -> None:
    assert registry.active(TASK) is None and registry.active_id(TASK) is None
    v1 = _import(registry, tmp_path, "1.0.0")
    promoted = registry.promote(v1["ir_int8"], by="alice", reason="first model")
    assert promoted.status == "active"
    assert registry.active(TASK) == promoted
    v2 = _import(registry, tmp_path, "2.0.0", fp32_dice=0.92, int8_dice=0.915)
    registry.promote(v2["ir_int8"], by="bob")
    assert registry.active(TASK) is not None and registry.active(TASK).id == v2["ir_int8"]
    assert registry.active_id(TASK) == v2["ir_int8"]
    assert registry.active_id("brats_regions") is None
    assert registry.active_ids([TASK, "brats_regions"]) == {TASK: v2["ir_int8"]}
    assert registry.get(v1["ir_int8"]).status == "candidate"
    assert [m.id for m in registry.list_models() if m.status == "active"] == [v2["ir_int8"]]
    events = [e for e in registry.history(TASK) if e.action == "promote"]
    assert [(e.from_model_id, e.to_model_id, e.by, e.reason, e.forced) for e in events] == [
        (None, v1["ir_int8"], "alice", "first model", False),
        (v1["ir_int8"], v2["ir_int8"], "bob", "", False),
    ]
    assert events[1].details is not None and events[1].details["parent_dice"] == pytest.approx(0.92)
    with pytest.raises(PromotionRefused, match="already the active model"):
        registry.promote(v2["ir_int8"])


def test_int8_dice_drop_beyond_tolerance_is_refused_unless_forced(
    registry: Registry, migrated_db_url: str, tmp_path: Path
) -> None:
    ids = _import(registry, tmp_path, fp32_dice=0.90, int8_dice=0.85)
    with pytest.raises(PromotionRefused) as info:
        registry.promote(ids["ir_int8"], by="carol")
    message = str(info.value)
    assert f"model #{ids['ir_int8']} not promoted" in message
    assert (
        f"INT8 Dice 0.8500 is 0.0500 below FP32 parent #{ids['ir_fp32']}'s 0.9000 (tolerance 0.0100)"
        in message
    )
    assert "--force --reason" in message
    assert registry.active(TASK) is None
    assert _actions(registry) == [("refused", None, ids["ir_int8"])]
    assert registry.history(TASK)[-1].by == "carol"
    with pytest.raises(PromotionRefused, match="--force needs a non-empty --reason"):
        registry.promote(ids["ir_int8"], force=True, reason="  ")
    assert registry.active(TASK) is None
    forced = registry.promote(ids["ir_int8"], force=True, reason="urgent: FP32 too slow on site", by="carol")
    assert forced.status == "active"
    event = registry.history(TASK)[-1]
    assert (event.action, event.forced, event.reason) == ("promote", True, "urgent: FP32 too slow on site")
    assert event.details is not None and "below FP32 parent" in event.details["overridden"][0]
    # a wider tolerance lets a model with the same drop through without force
    lenient = Registry(make_session_factory(make_engine(migrated_db_url)), tolerance=0.06)
    again = _import(lenient, tmp_path, "1.0.1", fp32_dice=0.90, int8_dice=0.85)
    assert lenient.promote(again["ir_int8"]).status == "active"
    lenient.close()


def test_int8_that_failed_its_own_export_check_is_refused_unless_forced(
    registry: Registry, tmp_path: Path
) -> None:
    """An INT8 model exported with --max-dice-drop must meet that limit, not only the registry's 0.01:
    a failed check recorded in its card (the Dice drop's or the false tumour's), or a drop beyond the
    card's stricter limit, needs --force."""
    failed = {
        "max_dice_drop": 0.0001,
        "accuracy_check": {"max_dice_drop": 0.0001, "dice_drop": 0.0018, "worst": "mean", "passed": False},
    }
    ids = _import(registry, tmp_path, "1.0.0", fp32_dice=0.90, int8_dice=0.8982, calibration=failed)
    with pytest.raises(PromotionRefused) as info:
        registry.promote(ids["ir_int8"])
    message = str(info.value)
    assert "the export's own INT8 accuracy check failed: Dice drop 0.0018 (mean) exceeds its" in message
    assert "(tolerance 0.0001)" in message and "--force --reason" in message
    assert registry.active(TASK) is None
    forced = registry.promote(ids["ir_int8"], force=True, reason="reviewed the cases", by="dan")
    assert forced.status == "active"
    event = registry.history(TASK)[-1]
    assert event.forced and event.details is not None and len(event.details["overridden"]) == 2
    assert event.details["tolerance"] == pytest.approx(0.0001)
    # the Helm export Job's --max-dice-drop 0.005: a 0.008 drop is within the registry's 0.01, not the card's
    helm = {"max_dice_drop": 0.005}
    strict = _import(registry, tmp_path, "2.0.0", fp32_dice=0.90, int8_dice=0.892, calibration=helm)
    with pytest.raises(PromotionRefused, match=r"0\.0080 below FP32 parent .* \(tolerance 0\.0050\)"):
        registry.promote(strict["ir_int8"])
    # a check that passed, and a looser card limit than the registry's, change nothing
    passed = {
        "max_dice_drop": 0.05,
        "accuracy_check": {"max_dice_drop": 0.05, "dice_drop": 0.004, "worst": "mean", "passed": True},
    }
    ok = _import(registry, tmp_path, "3.0.0", fp32_dice=0.90, int8_dice=0.896, calibration=passed)
    assert registry.promote(ok["ir_int8"]).status == "active"
    # the false-tumour check (segnode export, trainer/false_tumour.py) failed: Dice alone would pass
    more_false = {
        "false_tumour_check": {"fp32_ml": 91.0, "int8_ml": 148.96, "limit_ml": 115.75, "passed": False},
    }
    eager = _import(registry, tmp_path, "3.1.0", fp32_dice=0.90, int8_dice=0.899, calibration=more_false)
    refused = r"false-tumour check failed: 148\.96 mL against its FP32 IR's 91\.0 mL \(limit 115\.75 mL\)"
    with pytest.raises(PromotionRefused, match=refused):
        registry.promote(eager["ir_int8"])
    assert registry.promote(eager["ir_int8"], force=True, reason="reviewed", by="dan").status == "active"
    fine = {"false_tumour_check": {"fp32_ml": 22.0, "int8_ml": 21.4, "limit_ml": 29.5, "passed": True}}
    ok = _import(registry, tmp_path, "3.2.0", fp32_dice=0.90, int8_dice=0.899, calibration=fine)
    assert registry.promote(ok["ir_int8"]).status == "active"
    loose = _import(registry, tmp_path, "4.0.0", fp32_dice=0.90, int8_dice=0.87, calibration=passed)
    with pytest.raises(PromotionRefused, match=r"\(tolerance 0\.0100\)"):
        registry.promote(loose["ir_int8"])


def test_int8_region_dice_drops_are_gated_for_brats_regions(registry: Registry, tmp_path: Path) -> None:
    """A brats_regions model's mean Dice is the whole tumour's: an INT8 model that keeps it but loses the
    enhancing tumour and the core against its FP32 parent must not pass for an equal one."""
    regions = {"task": "brats_regions", "modalities": ("FLAIR", "T1", "T1GD", "T2")}
    ids = _import(
        registry,
        tmp_path,
        "1.0.0",
        fp32_dice=0.90,
        int8_dice=0.90,
        fp32_regions={"WT": 0.90, "TC": 0.80, "ET": 0.75},
        int8_regions={"WT": 0.90, "TC": 0.60, "ET": 0.40},
        **regions,
    )
    with pytest.raises(PromotionRefused) as info:
        registry.promote(ids["ir_int8"])
    message = str(info.value)
    assert f"INT8 ET Dice 0.4000 is 0.3500 below FP32 parent #{ids['ir_fp32']}'s 0.7500" in message
    assert f"INT8 TC Dice 0.6000 is 0.2000 below FP32 parent #{ids['ir_fp32']}'s 0.8000" in message
    assert "WT Dice" not in message and "--force --reason" in message
    assert registry.active("brats_regions") is None
    lost = _import(
        registry,
        tmp_path,
        "2.0.0",
        fp32_regions={"WT": 0.90, "TC": 0.80, "ET": 0.75},
        int8_regions={"WT": 0.90, "TC": 0.80},
        **regions,
    )
    with pytest.raises(PromotionRefused, match=r"INT8 model has no metrics\.regions\.ET\.dice"):
        registry.promote(lost["ir_int8"])
    within = _import(
        registry,
        tmp_path,
        "3.0.0",
        fp32_dice=0.90,
        int8_dice=0.895,
        fp32_regions={"WT": 0.90, "TC": 0.80, "ET": 0.75},
        int8_regions={"WT": 0.895, "TC": 0.805, "ET": 0.741},
        **regions,
    )
    assert registry.promote(within["ir_int8"]).status == "active"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"int8_dice": None}, "metrics missing: no metrics.mean.dice"),
        ({"int8_cases": ("case_001", "case_002")}, "INT8 metrics are on other cases than FP32 parent"),
        ({"fp32_dice": None}, "has no metrics.mean.dice to compare with"),
    ],
)
def test_metric_gates(registry: Registry, tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    ids = _import(registry, tmp_path, **kwargs)
    with pytest.raises(PromotionRefused, match=message):
        registry.promote(ids["ir_int8"])
    assert registry.active(TASK) is None


def test_hard_gates_cannot_be_forced(registry: Registry, tmp_path: Path) -> None:
    ids = _import(registry, tmp_path)
    with pytest.raises(PromotionRefused, match="kind 'onnx' cannot be active: the node runs only ir models"):
        registry.promote(ids["onnx"], force=True, reason="try")
    binary = registry.get(ids["ir_int8"]).files[1].path
    binary.write_bytes(binary.read_bytes() + b"x")
    with pytest.raises(PromotionRefused) as info:
        registry.promote(ids["ir_int8"], force=True, reason="try")
    assert f"file {binary}: size" in str(info.value)
    assert "--force" not in str(info.value)
    assert registry.active(TASK) is None
    assert [a for a, _, _ in _actions(registry)] == ["refused", "refused"]
    with pytest.raises(ModelNotFoundError, match="model #999 does not exist"):
        registry.promote(999)


def test_rollback_walks_back_through_the_audit_trail(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RollbackError, match="task 'whole_tumor' has no active model"):
        registry.rollback(TASK)
    a = _import(registry, tmp_path, "1")["ir_int8"]
    b = _import(registry, tmp_path, "2")["ir_int8"]
    c = _import(registry, tmp_path, "3")["ir_int8"]
    registry.promote(a)
    with pytest.raises(RollbackError, match="no previous active model"):
        registry.rollback(TASK)
    registry.promote(b)
    registry.promote(c)
    assert registry.rollback(TASK, by="dave", reason="C misses small lesions").id == b
    assert registry.get(c).status == "candidate"
    assert registry.rollback(TASK).id == a
    with pytest.raises(RollbackError, match="no previous active model"):
        registry.rollback(TASK)
    assert _actions(registry) == [
        ("promote", None, a),
        ("promote", a, b),
        ("promote", b, c),
        ("rollback", c, b),
        ("rollback", b, a),
    ]
    rollback = next(e for e in registry.history(TASK) if e.action == "rollback")
    assert (rollback.by, rollback.reason) == ("dave", "C misses small lesions")
    assert [m.id for m in registry.list_models() if m.status == "active"] == [a]


def test_retire_and_rollback_skips_retired(registry: Registry, tmp_path: Path) -> None:
    a = _import(registry, tmp_path, "1")["ir_int8"]
    b = _import(registry, tmp_path, "2")["ir_int8"]
    c = _import(registry, tmp_path, "3")["ir_int8"]
    for model_id in (a, b, c):
        registry.promote(model_id)
    with pytest.raises(RetireRefusedError, match=f"model #{c} is the active model of task whole_tumor"):
        registry.retire(c)
    assert registry.retire(b, by="erin", reason="bad on 3T data").status == "retired"
    with pytest.raises(RetireRefusedError, match=f"model #{b} is already retired"):
        registry.retire(b)
    with pytest.raises(ModelRetiredError, match=f"model #{b} is retired and cannot be promoted"):
        registry.promote(b)
    with pytest.raises(ModelRetiredError, match=f"model #{b} is retired"):
        registry.verify(b)
    assert registry.rollback(TASK).id == a  # b is skipped
    retire = next(e for e in registry.history(TASK) if e.action == "retire")
    assert (retire.from_model_id, retire.to_model_id, retire.by, retire.reason) == (
        b,
        None,
        "erin",
        "bad on 3T data",
    )
    with pytest.raises(ModelNotFoundError):
        registry.retire(12345)


def test_rollback_refuses_a_previous_model_whose_files_changed(registry: Registry, tmp_path: Path) -> None:
    a = _import(registry, tmp_path, "1")["ir_int8"]
    b = _import(registry, tmp_path, "2")["ir_int8"]
    registry.promote(a)
    registry.promote(b)
    registry.get(a).files[0].path.unlink()
    with pytest.raises(RollbackError, match=f"cannot roll back to model #{a}: .*model_int8.xml: missing"):
        registry.rollback(TASK)
    assert registry.active(TASK).id == b


@pytest.mark.parametrize("previous_active", [False, True])
def test_concurrent_change_is_detected_and_nothing_is_half_done(
    migrated_db_url: str,
    tmp_path: Path,
    previous_active: bool,
    request: pytest.FixtureRequest,
) -> None:
    """A second admin's promotion commits between this promotion's gates and its write."""
    registry = open_registry(migrated_db_url)
    request.addfinalizer(registry.close)
    base = _import(registry, tmp_path, "0")["ir_int8"]
    mine = _import(registry, tmp_path, "1")["ir_int8"]
    theirs = _import(registry, tmp_path, "2")["ir_int8"]
    if previous_active:
        registry.promote(base)
    other_admin = Registry(make_session_factory(make_engine(migrated_db_url)))
    racing = Registry(
        make_session_factory(make_engine(migrated_db_url)),
        before_write=lambda: other_admin.promote(theirs, by="bob"),
    )
    with pytest.raises(ConcurrentPromotionError) as info:
        racing.promote(mine, by="alice")
    racing.close()
    other_admin.close()
    assert f"model #{mine} not promoted" in str(info.value) and "nothing was changed" in str(info.value)
    assert [m.id for m in registry.list_models() if m.status == "active"] == [theirs]
    assert registry.get(mine).status == "candidate"
    expected_from = base if previous_active else None
    tail = [(e.action, e.from_model_id, e.to_model_id, e.by) for e in registry.history(TASK)][-2:]
    assert tail == [("promote", expected_from, theirs, "bob"), ("refused", expected_from, mine, "alice")]


def test_polling_the_active_model_is_not_blocked_by_a_writer(migrated_db_url: str, tmp_path: Path) -> None:
    """While an admin command holds the write lock, the node's poll still answers at once."""
    import time

    from db.models import Model
    from db.session import write_options

    registry = open_registry(migrated_db_url)
    try:
        model_id = _import(registry, tmp_path)["ir_int8"]
        registry.promote(model_id)
        writer_engine = make_engine(migrated_db_url)
        with make_session_factory(writer_engine).begin() as writer:
            writer.connection(execution_options=write_options())
            writer.get(Model, model_id)  # the write transaction (BEGIN IMMEDIATE on SQLite) is open
            start = time.monotonic()
            assert registry.active_id(TASK) == model_id
            assert registry.active(TASK) is not None
            assert time.monotonic() - start < 5.0  # far below the 30 s busy timeout
        writer_engine.dispose()
    finally:
        registry.close()


def test_promote_refuses_a_card_the_node_cannot_run_even_forced(registry: Registry, tmp_path: Path) -> None:
    """A row whose card the node would refuse (registered through the API, or imported before import
    checked cards) is never made active: the node would serve the previous model, or none."""
    from tests.helpers.node import make_threshold_model

    directory = make_threshold_model(tmp_path / "m", crop=(32, 32))
    card = json.loads((directory / "model.json").read_text())
    card["preprocessing"]["orientation"] = "LPS"
    info = registry.register(
        name=card["name"],
        version=card["version"],
        task=TASK,
        modalities=card["modalities"],
        kind="ir",
        precision="fp32",
        files=[directory / "model_fp32.xml", directory / "model_fp32.bin"],
        metrics=card["artifacts"][0]["metrics"],
        card={k: v for k, v in card.items() if k != "artifacts"},
    )
    for force in (False, True):
        with pytest.raises(PromotionRefused, match=r"preprocessing\.orientation 'LPS' is not supported"):
            registry.promote(info.id, by="test", reason="forced" if force else "", force=force)
    assert registry.active(TASK) is None


def test_an_unmigrated_database_is_named_as_every_database_path_names_it(tmp_path: Path) -> None:
    """The registry's "unavailable" message names the driver's error and says what to run, as the job
    queue's and the receiver's do: the node logs one outage line, whichever loop meets it first."""
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        with pytest.raises(DatabaseUnavailableError) as info:
            Registry(make_session_factory(engine)).active("whole_tumor")
    finally:
        engine.dispose()
    assert str(info.value).startswith("database error: OperationalError: no such table: models"), info.value
    assert str(info.value).endswith("(run `segnode db upgrade`)")
