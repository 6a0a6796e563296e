"""The model registry: register and import artifacts, verify them, promote, roll back, retire.

The trainer registers what it exports, the node asks for the active model of its task
(:meth:`Registry.active`, one cheap query), and admins drive rollout through ``segnode models``.

Rules
-----
* Only ``ir`` artifacts can be active (the node runs OpenVINO IR only); promoting a checkpoint or an
  ONNX row is refused, and ``force`` does not override that.
* Promotion gates: every file present and matching its recorded sha256 (hard: the node would refuse
  the model anyway); metrics present (``metrics.mean.dice`` and ``metrics.cases``); an INT8 model's
  Dice within ``tolerance`` (default 0.01; the ``--max-dice-drop`` it was exported with when that is
  smaller) of its FP32 parent's on the same cases, the mean's and each region's (``brats_regions``),
  and its export's own accuracy check not failed.
  The metric gates can be overridden with ``force=True`` and a non-empty reason, which the audit trail
  records together with the overridden gates.
* Exactly one active model per task: the database enforces it (partial unique index). A promotion
  checks, inside its write transaction, that the task's active model is still the one it saw when
  its gates ran; if another promotion, rollback or retirement committed in between, it raises
  :class:`~db.exceptions.ConcurrentPromotionError`, changes nothing, and records a ``refused`` event.
* Every refused promotion of an existing model is recorded as a ``refused`` event (who, why).
* Rollback re-activates the previous active model of the task, read from the audit trail as a
  stack (promotions push, rollbacks pop; retired models are skipped); the model rolled back from
  returns to ``candidate``. Rolling back twice after two promotions returns to the first model.
* Retiring the active model is refused: promote another model or roll back first.
* Importing a model directory twice is idempotent: artifacts already registered with the same files
  (sha256 and size) and lineage are returned as they are; the same name, version, kind and precision
  with different files is an error (give the new model another version).
"""

from __future__ import annotations

import datetime as dt
import getpass
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

from sqlalchemy import CursorResult, Engine, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from converters.exceptions import ModelCardError
from db.card import (
    CARD_NAME,
    FileCheck,
    ModelDir,
    check_file,
    check_runnable_card,
    read_model_dir,
    sha256_file,
)
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
from db.models import (
    ACTOR_MAX,
    ID_MAX,
    KINDS,
    NAME_MAX,
    PRECISIONS,
    RUNNABLE_KINDS,
    TASKS,
    VERSION_MAX,
    Model,
    ModelFile,
    RolloutEvent,
    utcnow,
)
from db.session import make_engine, make_session_factory, upgrade, write_options
from db.transactions import as_utc, describe

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.01


class ModelFileInfo(NamedTuple):
    """One file of a model: absolute path, recorded sha256 (hex) and size in bytes."""

    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class ModelInfo:
    """A snapshot of one row of the model table (safe to keep outside a session)."""

    id: int
    name: str
    version: str
    task: str
    modalities: tuple[str, ...]
    kind: str
    precision: str
    parent_id: int | None
    status: str
    files: tuple[ModelFileInfo, ...]
    metrics: dict[str, Any] | None
    calibration: dict[str, Any] | None
    training: dict[str, Any] | None
    card: dict[str, Any] | None
    created_at: dt.datetime

    @property
    def dice(self) -> float | None:
        """``metrics.mean.dice``, or None when absent."""
        return _dice(self.metrics)

    @property
    def size(self) -> int:
        """Total size of the model's files in bytes."""
        return sum(f.size for f in self.files)

    @property
    def label(self) -> str:
        """``#id name version kind/precision``, for messages."""
        return f"#{self.id} {self.name} {self.version} {self.kind}/{self.precision}"

    def file_with_suffix(self, suffix: str) -> Path:
        """The path of the model's (first) file ending in ``suffix``, e.g. ``".xml"``.

        Raises
        ------
        RegistryError
            The model has no such file.
        """
        for f in self.files:
            if f.path.name.endswith(suffix):
                return f.path
        raise RegistryError(
            f"model #{self.id} has no {suffix} file (files: {[f.path.name for f in self.files]})"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (paths as strings, created_at ISO 8601)."""
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "modalities": list(self.modalities),
            "kind": self.kind,
            "precision": self.precision,
            "parent_id": self.parent_id,
            "status": self.status,
            "files": [{"path": str(f.path), "sha256": f.sha256, "size": f.size} for f in self.files],
            "size": self.size,
            "dice": self.dice,
            "metrics": self.metrics,
            "calibration": self.calibration,
            "training": self.training,
            "card": self.card,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class EventInfo:
    """A snapshot of one audit-trail entry (see :class:`db.models.RolloutEvent` for from/to)."""

    id: int
    task: str
    action: str
    from_model_id: int | None
    to_model_id: int | None
    by: str
    at: dt.datetime
    reason: str
    forced: bool
    details: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "id": self.id,
            "task": self.task,
            "action": self.action,
            "from_model_id": self.from_model_id,
            "to_model_id": self.to_model_id,
            "by": self.by,
            "at": self.at.isoformat(),
            "reason": self.reason,
            "forced": self.forced,
            "details": self.details,
        }


@dataclass(frozen=True)
class VerifyReport:
    """The result of :meth:`Registry.verify`: one :class:`~db.card.FileCheck` per file."""

    model_id: int
    files: tuple[FileCheck, ...]

    @property
    def ok(self) -> bool:
        """True when every file is present and matches its recorded sha256 and size."""
        return all(f.ok for f in self.files)

    @property
    def problems(self) -> list[str]:
        """One line per missing or mismatching file."""
        return [f.describe() for f in self.files if not f.ok]


def default_user() -> str:
    """The OS user name, recorded as who acted when ``by`` is not given."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def _dice(metrics: dict[str, Any] | None) -> float | None:
    mean = (metrics or {}).get("mean")
    value = mean.get("dice") if isinstance(mean, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _region_dice(metrics: dict[str, Any] | None) -> dict[str, float | None]:
    """``metrics.regions.<region>.dice`` by region (None: not a number there); empty without regions."""
    regions = (metrics or {}).get("regions")
    if not isinstance(regions, dict):
        return {}
    return {str(name): _dice({"mean": block}) for name, block in regions.items()}


def _int8_drops(info: ModelInfo, parent: ModelInfo, tolerance: float) -> list[str]:
    """The INT8 gate's Dice comparisons that fail: the mean, and each region's (``brats_regions``: the
    mean is the whole tumour's, so a lost enhancing tumour or core shows only in its region)."""
    problems = []
    dice, parent_dice = info.dice, parent.dice
    if dice is not None and parent_dice is not None and parent_dice - dice > tolerance + 1e-12:
        problems.append(
            f"INT8 Dice {dice:.4f} is {parent_dice - dice:.4f} below FP32 parent #{parent.id}'s "
            f"{parent_dice:.4f} (tolerance {tolerance:.4f})"
        )
    ours, theirs = _region_dice(info.metrics), _region_dice(parent.metrics)
    for region in sorted(set(ours) | set(theirs)):
        mine, base = ours.get(region), theirs.get(region)
        if mine is None or base is None:
            which = "INT8 model" if mine is None else f"FP32 parent #{parent.id}"
            problems.append(f"{which} has no metrics.regions.{region}.dice for the per-region Dice check")
        elif base - mine > tolerance + 1e-12:
            problems.append(
                f"INT8 {region} Dice {mine:.4f} is {base - mine:.4f} below FP32 parent #{parent.id}'s "
                f"{base:.4f} (tolerance {tolerance:.4f})"
            )
    return problems


def _actor(by: str | None) -> str:
    """Who acts: ``by``, or the OS user; a ``by`` longer than the audit trail's column is refused."""
    if by is not None and len(by) > ACTOR_MAX:
        raise RegistryError(f"--by {by[:20]!r}... is {len(by)} characters long; at most {ACTOR_MAX}")
    return by or default_user()


def _is_id(value: int) -> bool:
    """Whether ``value`` can be a row id (PostgreSQL refuses to compare an integer column with more)."""
    return 1 <= value <= ID_MAX


def _aware(value: dt.datetime) -> dt.datetime:
    """``value`` in UTC: PostgreSQL answers in its session's time zone (the server's ``timezone``,
    the host's zone after Debian's initdb), SQLite naive UTC."""
    utc = as_utc(value)
    assert utc is not None
    return utc


def _snapshot(row: Model) -> ModelInfo:
    return ModelInfo(
        id=row.id,
        name=row.name,
        version=row.version,
        task=row.task,
        modalities=tuple(row.modalities),
        kind=row.kind,
        precision=row.precision,
        parent_id=row.parent_id,
        status=row.status,
        files=tuple(ModelFileInfo(Path(f.path), f.sha256, f.size) for f in row.files),
        metrics=row.metrics,
        calibration=row.calibration,
        training=row.training,
        card=row.card,
        created_at=_aware(row.created_at),
    )


def _event_snapshot(row: RolloutEvent) -> EventInfo:
    return EventInfo(
        id=row.id,
        task=row.task,
        action=row.action,
        from_model_id=row.from_model_id,
        to_model_id=row.to_model_id,
        by=row.actor,
        at=_aware(row.at),
        reason=row.reason,
        forced=row.forced,
        details=row.details,
    )


def _rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


def activation_stack(events: Sequence[EventInfo]) -> list[int]:
    """The task's active models as a stack, oldest first, from its ``promote``/``rollback`` events.

    A promotion pushes the promoted model; a rollback pops down to the model it re-activated.
    The top of the stack is the current active model; the one below it is where a rollback goes.
    """
    stack: list[int] = []
    for ev in events:
        if ev.to_model_id is None:
            continue
        if ev.action == "promote":
            stack.append(ev.to_model_id)
        elif ev.action == "rollback":
            if stack:
                stack.pop()
            while stack and stack[-1] != ev.to_model_id:
                stack.pop()
            if not stack:
                stack.append(ev.to_model_id)
    return stack


class Registry:
    """The model table's API.

    Parameters
    ----------
    sessions
        Session factory (:func:`db.session.make_session_factory`) of a database at the head revision.
    tolerance
        Largest allowed Dice drop of an INT8 model below its FP32 parent (promotion gate).
    before_write
        Called after a promotion's or rollback's checks pass and just before its write transaction;
        tests use it to line up concurrent promotions. None in normal use.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        tolerance: float = DEFAULT_TOLERANCE,
        before_write: Callable[[], None] | None = None,
    ) -> None:
        if tolerance < 0:
            raise RegistryError(f"promotion tolerance {tolerance!r} must not be negative")
        self._sessions = sessions
        self.tolerance = tolerance
        self._before_write = before_write

    def close(self) -> None:
        """Close the pooled connections of the engine the session factory is bound to."""
        bind = self._sessions.kw.get("bind")
        if isinstance(bind, Engine):
            bind.dispose()

    # -- sessions -------------------------------------------------------------------------------

    @contextmanager
    def _db_errors(self) -> Iterator[None]:
        try:
            yield
        except (OperationalError, ProgrammingError) as exc:
            # Named as every other database path names it ("OperationalError: connection failed: ..."),
            # so that an outage reads the same whichever loop meets it first.
            reason = describe(exc)
            hint = " (run `segnode db upgrade`)" if "models" in reason or "rollout_events" in reason else ""
            raise DatabaseUnavailableError(f"database error: {reason}{hint}") from None
        except IntegrityError:
            raise  # the caller says which uniqueness or lineage rule failed
        except DBAPIError as exc:  # DataError (a value out of range, too long) and the like
            first = str(exc.orig or exc).strip().splitlines()[0]
            raise DatabaseOperationError(f"database error: {type(exc).__name__}: {first}") from None

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._db_errors(), self._sessions() as session:
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """One write transaction (``BEGIN IMMEDIATE`` on SQLite); committed on exit, rolled back on error."""
        with self._db_errors(), self._sessions.begin() as session:
            session.connection(execution_options=write_options())
            yield session

    @staticmethod
    def _load(session: Session, model_id: int) -> Model:
        if not _is_id(model_id):
            raise ModelNotFoundError(f"model #{model_id} does not exist (see `segnode models list`)")
        row = session.scalars(
            select(Model).where(Model.id == model_id).options(selectinload(Model.files))
        ).one_or_none()
        if row is None:
            raise ModelNotFoundError(f"model #{model_id} does not exist (see `segnode models list`)")
        return row

    @staticmethod
    def _active_row(session: Session, task: str) -> Model | None:
        return session.scalars(
            select(Model)
            .where(Model.task == task, Model.status == "active")
            .options(selectinload(Model.files))
        ).one_or_none()

    # -- reading --------------------------------------------------------------------------------

    def get(self, model_id: int) -> ModelInfo:
        """The model with ``model_id`` (any status).

        Raises
        ------
        ModelNotFoundError
            No such model.
        """
        with self._read() as session:
            return _snapshot(self._load(session, model_id))

    def list_models(self, task: str | None = None) -> list[ModelInfo]:
        """All models (of ``task`` when given), oldest first."""
        query = select(Model).options(selectinload(Model.files)).order_by(Model.id)
        if task is not None:
            query = query.where(Model.task == task)
        with self._read() as session:
            return [_snapshot(row) for row in session.scalars(query)]

    def active(self, task: str) -> ModelInfo | None:
        """The active model of ``task``, or None. Two indexed queries; cheap enough to poll."""
        with self._read() as session:
            row = self._active_row(session, task)
            return _snapshot(row) if row is not None else None

    def active_id(self, task: str) -> int | None:
        """The id of the active model of ``task``, or None: one index lookup, for frequent polling."""
        with self._read() as session:
            return session.scalars(
                select(Model.id).where(Model.task == task, Model.status == "active")
            ).one_or_none()

    def active_ids(self, tasks: Sequence[str]) -> dict[str, int]:
        """The active model id of each of ``tasks`` that has one: one query for a worker's every poll."""
        with self._read() as session:
            rows = session.execute(
                select(Model.task, Model.id).where(Model.task.in_(list(tasks)), Model.status == "active")
            )
            return {str(task): int(model_id) for task, model_id in rows}

    def history(self, task: str | None = None) -> list[EventInfo]:
        """The audit trail (of ``task`` when given), oldest first."""
        query = select(RolloutEvent).order_by(RolloutEvent.id)
        if task is not None:
            query = query.where(RolloutEvent.task == task)
        with self._read() as session:
            return [_event_snapshot(row) for row in session.scalars(query)]

    def verify(self, model_id: int) -> VerifyReport:
        """Check every file of model ``model_id`` against its recorded sha256 and size.

        Raises
        ------
        ModelNotFoundError
            No such model.
        ModelRetiredError
            The model is retired (its files may be gone on purpose).
        """
        info = self.get(model_id)
        if info.status == "retired":
            raise ModelRetiredError(f"model #{model_id} is retired; its files are no longer tracked")
        return VerifyReport(model_id, tuple(check_file(f.path, f.sha256, f.size) for f in info.files))

    # -- registering ----------------------------------------------------------------------------

    def register(
        self,
        *,
        name: str,
        version: str,
        task: str,
        modalities: Sequence[str],
        kind: str,
        precision: str,
        files: Sequence[Path],
        base_dir: Path | None = None,
        parent_id: int | None = None,
        metrics: dict[str, Any] | None = None,
        calibration: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        card: dict[str, Any] | None = None,
        by: str | None = None,
    ) -> ModelInfo:
        """Register one artifact as a ``candidate``, computing the sha256 and size of each file.

        Parameters
        ----------
        files
            The artifact's files; relative paths are taken relative to ``base_dir`` (default: the
            current directory). Stored as absolute paths.
        parent_id
            The artifact it was made from (lineage: INT8 IR -> FP32 IR -> ONNX -> checkpoint).

        Raises
        ------
        InvalidArtifactError
            A field is invalid, a file is missing, the parent does not exist, or the same name,
            version, kind and precision is already registered.
        """
        where = f"artifact {name!r} {version!r} {kind}/{precision}"
        _check_fields(
            where,
            name=name,
            version=version,
            task=task,
            modalities=modalities,
            kind=kind,
            precision=precision,
        )
        actor = _actor(by)
        if not files:
            raise InvalidArtifactError(f"{where}: files is empty; an artifact needs at least one file")
        base = (base_dir or Path.cwd()).resolve()
        paths = [(base / p).resolve() for p in files]
        for path in paths:
            if not path.is_file():
                raise InvalidArtifactError(f"{where}: file {path} does not exist")
        entries = [(p, sha256_file(p), p.stat().st_size) for p in paths]
        row = Model(
            name=name,
            version=version,
            task=task,
            modalities=list(modalities),
            kind=kind,
            precision=precision,
            parent_id=parent_id,
            status="candidate",
            metrics=metrics,
            calibration=calibration,
            training=training,
            card=card,
            files=[
                ModelFile(position=n, path=str(p), sha256=s, size=z) for n, (p, s, z) in enumerate(entries)
            ],
        )
        try:
            with self._write() as session:
                if parent_id is not None and (not _is_id(parent_id) or session.get(Model, parent_id) is None):
                    raise InvalidArtifactError(f"{where}: parent_id {parent_id} is not a registered model")
                self._check_unique(session, name, version, kind, precision, where)
                session.add(row)
                session.flush()
                session.add(
                    RolloutEvent(
                        task=task,
                        action="register",
                        to_model_id=row.id,
                        actor=actor,
                        reason="registered",
                    )
                )
                info = _snapshot(row)
        except IntegrityError as exc:
            raise InvalidArtifactError(f"{where}: cannot register: {str(exc.orig).splitlines()[0]}") from None
        log.info("registered model %s", info.label)
        return info

    @staticmethod
    def _check_unique(
        session: Session, name: str, version: str, kind: str, precision: str, where: str
    ) -> None:
        existing = session.scalars(
            select(Model.id).where(
                Model.name == name, Model.version == version, Model.kind == kind, Model.precision == precision
            )
        ).first()
        if existing is not None:
            raise InvalidArtifactError(
                f"{where}: already registered as model #{existing}; use another version"
            )

    def import_dir(self, directory: Path, *, by: str | None = None) -> list[ModelInfo]:
        """Register every artifact of a model directory (``model.json`` + files), in one transaction.

        Artifacts are registered parents first, with their lineage from the card's ``parent`` keys.
        Idempotent: an artifact already registered with the same files and lineage is returned as
        it is.

        Returns
        -------
        list[ModelInfo]
            One per artifact of the card, parents first.

        Raises
        ------
        InvalidModelDirectory
            ``model.json`` is missing or malformed, a listed file is missing or tampered with, or an
            artifact is already registered with different files. Nothing is registered.
        """
        model_dir = read_model_dir(directory)
        card_file = model_dir.directory / CARD_NAME
        actor = _actor(by)
        try:
            with self._write() as session:
                rows = self._import_rows(session, model_dir, card_file, actor)
                infos = [_snapshot(row) for row in rows]
        except IntegrityError as exc:
            raise InvalidModelDirectory(
                f"{card_file}: cannot register (another import of it ran at the same time?): "
                f"{str(exc.orig).splitlines()[0]}"
            ) from None
        log.info(
            "imported %s %s from %s: models %s",
            model_dir.name,
            model_dir.version,
            model_dir.directory,
            ", ".join(f"#{i.id}" for i in infos),
        )
        return infos

    def _import_rows(self, session: Session, model_dir: ModelDir, card_file: Path, actor: str) -> list[Model]:
        ids: dict[str, int] = {}
        rows: list[Model] = []
        for art in model_dir.artifacts:
            parent_id = ids[art.parent] if art.parent is not None else None
            existing = session.scalars(
                select(Model)
                .options(selectinload(Model.files))
                .where(
                    Model.name == model_dir.name,
                    Model.version == model_dir.version,
                    Model.kind == art.kind,
                    Model.precision == art.precision,
                )
            ).one_or_none()
            if existing is not None:
                same_files = [(f.sha256, f.size) for f in existing.files] == [
                    (f.sha256, f.size) for f in art.files
                ]
                if not same_files or existing.parent_id != parent_id or existing.task != model_dir.task:
                    raise InvalidModelDirectory(
                        f"{card_file}: artifact {art.key!r} ({model_dir.name} {model_dir.version} "
                        f"{art.kind}/{art.precision}) is already registered as model #{existing.id} with "
                        "different files or lineage; give the new model another version"
                    )
                ids[art.key] = existing.id
                rows.append(existing)
                continue
            row = Model(
                name=model_dir.name,
                version=model_dir.version,
                task=model_dir.task,
                modalities=list(model_dir.modalities),
                kind=art.kind,
                precision=art.precision,
                parent_id=parent_id,
                status="candidate",
                metrics=art.metrics,
                calibration=model_dir.calibration,
                training=model_dir.training,
                card=model_dir.card,
                files=[
                    ModelFile(position=n, path=str(f.path), sha256=f.sha256, size=f.size)
                    for n, f in enumerate(art.files)
                ],
            )
            session.add(row)
            session.flush()
            session.add(
                RolloutEvent(
                    task=model_dir.task,
                    action="register",
                    to_model_id=row.id,
                    actor=actor,
                    reason=f"imported from {model_dir.directory} ({art.key})",
                )
            )
            ids[art.key] = row.id
            rows.append(row)
        session.flush()
        return rows

    # -- gates ----------------------------------------------------------------------------------

    def _hard_problems(self, info: ModelInfo, report: VerifyReport) -> list[str]:
        """Problems that no ``force`` overrides."""
        problems = []
        if info.status == "active":
            problems.append(f"it is already the active model of task {info.task}")
        if info.kind not in RUNNABLE_KINDS:
            problems.append(
                f"kind {info.kind!r} cannot be active: the node runs only {', '.join(RUNNABLE_KINDS)} models"
            )
        problems.extend(f"file {p}" for p in report.problems)
        if info.card is not None:  # imported before import checked it: the node would refuse it
            try:
                check_runnable_card(info.card, "its model card")
            except ModelCardError as exc:
                problems.append(str(exc))
        return problems

    def gate_problems(self, info: ModelInfo, parent: ModelInfo | None) -> list[str]:
        """The failed metric gates of ``info`` (empty when it may be promoted without ``force``).

        Gates: metrics present (``metrics.mean.dice`` and a non-empty ``metrics.cases``); for an INT8
        model, its export's own checks not failed (``calibration.accuracy_check.passed``: the Dice drop;
        ``calibration.false_tumour_check.passed``: false tumour against the FP32 IR's), and an
        FP32 parent with metrics on the same cases and a Dice at most the tolerance above, the mean's and
        each region's (``metrics.regions``): ``tolerance``, or the export's ``--max-dice-drop``
        (``calibration.max_dice_drop``) when that is stricter.
        """
        problems: list[str] = []
        dice = info.dice
        cases = (info.metrics or {}).get("cases")
        if dice is None:
            problems.append("metrics missing: no metrics.mean.dice")
        if not isinstance(cases, list) or not cases:
            problems.append("metrics missing: no metrics.cases (on which cases the Dice was measured)")
        if info.precision != "int8":
            return problems
        check = (info.calibration or {}).get("accuracy_check")
        if isinstance(check, dict) and check.get("passed") is False:
            drop, limit = check.get("dice_drop"), check.get("max_dice_drop")
            problems.append(
                "the export's own INT8 accuracy check failed: Dice drop "
                f"{f'{drop:.4f}' if isinstance(drop, (int, float)) else drop} ({check.get('worst', 'mean')}) "
                f"exceeds its --max-dice-drop {f'{limit:g}' if isinstance(limit, (int, float)) else limit}"
            )
        false_check = (info.calibration or {}).get("false_tumour_check")
        if isinstance(false_check, dict) and false_check.get("passed") is False:
            problems.append(
                "the export's own INT8 false-tumour check failed: "
                f"{false_check.get('int8_ml')} mL against its FP32 IR's {false_check.get('fp32_ml')} mL "
                f"(limit {false_check.get('limit_ml')} mL)"
            )
        if dice is None:
            return problems
        tolerance = self.int8_tolerance(info)
        if parent is None:
            problems.append("an INT8 model needs its FP32 parent for the Dice check, but has no parent")
        elif parent.precision != "fp32":
            problems.append(f"INT8 parent #{parent.id} has precision {parent.precision!r}, expected fp32")
        elif parent.dice is None:
            problems.append(f"FP32 parent #{parent.id} has no metrics.mean.dice to compare with")
        elif sorted(map(str, (parent.metrics or {}).get("cases") or [])) != sorted(map(str, cases or [])):
            problems.append(
                f"INT8 metrics are on other cases than FP32 parent #{parent.id}'s "
                f"({len(cases or [])} vs {len((parent.metrics or {}).get('cases') or [])} cases); "
                "the Dice comparison needs the same cases"
            )
        else:
            problems.extend(_int8_drops(info, parent, tolerance))
        return problems

    def int8_tolerance(self, info: ModelInfo) -> float:
        """The largest Dice drop of INT8 ``info`` below its FP32 parent that the gate lets through.

        The registry's ``tolerance``, or the ``--max-dice-drop`` the model was exported with
        (``calibration.max_dice_drop``) when that is smaller: a model must meet its own, stricter, limit.
        """
        limit = (info.calibration or {}).get("max_dice_drop")
        if isinstance(limit, (int, float)) and not isinstance(limit, bool) and 0 <= limit < self.tolerance:
            return float(limit)
        return self.tolerance

    # -- rollout --------------------------------------------------------------------------------

    def promote(
        self, model_id: int, *, by: str | None = None, reason: str = "", force: bool = False
    ) -> ModelInfo:
        """Make model ``model_id`` the active model of its task; the previous one becomes a candidate.

        Raises
        ------
        ModelNotFoundError
            No such model.
        ModelRetiredError
            The model is retired.
        PromotionRefused
            A gate failed (the message lists every failed gate), or ``force`` without a reason.
        ConcurrentPromotionError
            The task's active model changed while this promotion ran; nothing was changed.
        """
        actor = _actor(by)
        if force and not reason.strip():
            raise PromotionRefused(f"model #{model_id}: --force needs a non-empty --reason (it is recorded)")
        with self._read() as session:
            info = _snapshot(self._load(session, model_id))
            parent = _snapshot(self._load(session, info.parent_id)) if info.parent_id is not None else None
            current = self._active_row(session, info.task)
            expected = current.id if current is not None else None
        if info.status == "retired":
            raise ModelRetiredError(f"model #{model_id} is retired and cannot be promoted")
        hard = self._hard_problems(info, self.verify(model_id))
        soft = self.gate_problems(info, parent)
        if hard or (soft and not force):
            hint = "" if hard else "; to override, use --force --reason '...'"
            message = f"model #{model_id} not promoted: " + "; ".join(hard + soft) + hint
            if info.status != "active":
                self._record_refusal(info, expected, actor, message)
            raise PromotionRefused(message)
        if self._before_write is not None:
            self._before_write()
        tolerance = self.int8_tolerance(info) if info.precision == "int8" else self.tolerance
        details: dict[str, Any] = {"dice": info.dice, "tolerance": tolerance}
        if parent is not None:
            details["parent_dice"] = parent.dice
        if soft:
            details["overridden"] = soft
        self._switch(info, expected, "promote", actor, reason, bool(soft) and force, details)
        log.info("promoted model %s for task %s by %s (previous: %s)", info.label, info.task, actor, expected)
        return self.get(model_id)

    def _switch(
        self,
        target: ModelInfo,
        expected: int | None,
        action: str,
        actor: str,
        reason: str,
        forced: bool,
        details: dict[str, Any],
    ) -> None:
        """Atomically demote ``expected`` (the active model the checks saw) and activate ``target``."""
        conflict = ""
        try:
            with self._write() as session:
                if expected is not None:
                    demoted = session.execute(
                        update(Model)
                        .where(Model.id == expected, Model.status == "active")
                        .values(status="candidate")
                        .execution_options(synchronize_session=False)
                    )
                    if _rowcount(demoted) != 1:
                        conflict = f"model #{expected} is no longer the active model of task {target.task}"
                        raise _ConflictError
                activated = session.execute(
                    update(Model)
                    .where(Model.id == target.id, Model.status == "candidate")
                    .values(status="active")
                    .execution_options(synchronize_session=False)
                )
                if _rowcount(activated) != 1:
                    conflict = f"model #{target.id} is no longer a candidate"
                    raise _ConflictError
                session.flush()
                session.add(
                    RolloutEvent(
                        task=target.task,
                        action=action,
                        from_model_id=expected,
                        to_model_id=target.id,
                        actor=actor,
                        reason=reason,
                        forced=forced,
                        details=details,
                    )
                )
        except _ConflictError:
            pass
        except IntegrityError:
            conflict = f"another model of task {target.task} became active"
        if not conflict:
            return
        message = (
            f"model #{target.id} not {'promoted' if action == 'promote' else 'rolled back to'}: {conflict} "
            "while this command ran (another promotion, rollback or retirement committed first); "
            "nothing was changed; see `segnode models history`"
        )
        self._record_refusal(target, expected, actor, message)
        raise ConcurrentPromotionError(message)

    def _record_refusal(self, info: ModelInfo, expected: int | None, actor: str, message: str) -> None:
        try:
            with self._write() as session:
                session.add(
                    RolloutEvent(
                        task=info.task,
                        action="refused",
                        from_model_id=expected,
                        to_model_id=info.id,
                        actor=actor,
                        reason=message,
                    )
                )
        except RegistryError as exc:  # the refusal itself must still reach the caller
            log.warning("could not record refused promotion of model #%d: %s", info.id, exc)

    def rollback(self, task: str, *, by: str | None = None, reason: str = "") -> ModelInfo:
        """Re-activate the previous active model of ``task``; the current one becomes a candidate.

        Returns
        -------
        ModelInfo
            The model now active.

        Raises
        ------
        RollbackError
            The task has no active model, no previous active model (that is not retired), or the
            previous model's files no longer match their checksums.
        ConcurrentPromotionError
            The task's active model changed while this rollback ran; nothing was changed.
        """
        actor = _actor(by)
        with self._read() as session:
            current = self._active_row(session, task)
            if current is None:
                raise RollbackError(f"task {task!r} has no active model; nothing to roll back")
            current_id = current.id
            events = [
                _event_snapshot(e)
                for e in session.scalars(
                    select(RolloutEvent)
                    .where(RolloutEvent.task == task, RolloutEvent.action.in_(("promote", "rollback")))
                    .order_by(RolloutEvent.id)
                )
            ]
            target: ModelInfo | None = None
            for candidate_id in reversed(activation_stack(events)[:-1]):
                row = self._load(session, candidate_id)
                if candidate_id != current_id and row.status != "retired":
                    target = _snapshot(row)
                    break
        if target is None:
            raise RollbackError(
                f"task {task!r}: no previous active model to roll back to (model #{current_id} is the first "
                "active model in the audit trail, or the earlier ones are retired)"
            )
        report = self.verify(target.id)
        if not report.ok:
            raise RollbackError(
                f"task {task!r}: cannot roll back to model #{target.id}: " + "; ".join(report.problems)
            )
        if self._before_write is not None:
            self._before_write()
        self._switch(target, current_id, "rollback", actor, reason, False, {"dice": target.dice})
        log.info("rolled back task %s from model #%d to %s by %s", task, current_id, target.label, actor)
        return self.get(target.id)

    def retire(self, model_id: int, *, by: str | None = None, reason: str = "") -> ModelInfo:
        """Retire model ``model_id``: it can no longer be promoted or rolled back to.

        Raises
        ------
        ModelNotFoundError
            No such model.
        RetireRefusedError
            The model is already retired, or is the active model of its task.
        """
        actor = _actor(by)
        info = self.get(model_id)
        if info.status == "retired":
            raise RetireRefusedError(f"model #{model_id} is already retired")
        if info.status == "active":
            raise RetireRefusedError(
                f"model #{model_id} is the active model of task {info.task}; promote another model or roll "
                "back first, then retire it"
            )
        with self._write() as session:
            retired = session.execute(
                update(Model)
                .where(Model.id == model_id, Model.status == "candidate")
                .values(status="retired")
                .execution_options(synchronize_session=False)
            )
            if _rowcount(retired) != 1:
                raise ConcurrentPromotionError(
                    f"model #{model_id} not retired: its status changed while this command ran; nothing was "
                    "changed"
                )
            session.add(
                RolloutEvent(
                    task=info.task, action="retire", from_model_id=model_id, actor=actor, reason=reason
                )
            )
        log.info("retired model %s by %s", info.label, actor)
        return self.get(model_id)

    # -- evaluations ----------------------------------------------------------------------------

    def record_evaluation(
        self, model_id: int, evaluation: Mapping[str, Any], *, by: str | None = None
    ) -> ModelInfo:
        """Keep an evaluation of model ``model_id`` in its ``metrics.evaluations`` list.

        ``evaluation`` is what ``segnode evaluate`` measured: at least ``split`` (a name) and ``mean``
        (metric -> value); typically also ``data``, ``precision``, ``cases`` and ``per_case``. Who and
        when are added. An earlier entry with the same ``split`` is replaced. The model's own
        ``metrics.mean`` and ``metrics.cases`` (what the promotion gates read) are left alone.

        Raises
        ------
        ModelNotFoundError
            No such model.
        InvalidArtifactError
            ``split`` is not a non-empty string or ``mean`` is not an object.
        """
        split = evaluation.get("split")
        if not isinstance(split, str) or not split.strip():
            raise InvalidArtifactError(
                f"model #{model_id}: evaluation split {split!r} must be a non-empty name"
            )
        if not isinstance(evaluation.get("mean"), dict):
            raise InvalidArtifactError(f"model #{model_id}: evaluation has no 'mean' metrics")
        entry = {**evaluation, "by": by or default_user(), "at": utcnow().isoformat()}
        with self._write() as session:
            row = (
                session.scalars(select(Model).where(Model.id == model_id).with_for_update()).one_or_none()
                if _is_id(model_id)
                else None
            )
            if row is None:
                raise ModelNotFoundError(f"model #{model_id} does not exist (see `segnode models list`)")
            metrics = dict(row.metrics or {})
            kept = [e for e in metrics.get("evaluations") or [] if e.get("split") != split]
            metrics["evaluations"] = [*kept, entry]
            row.metrics = metrics  # a new object, so that the JSON column is written
        log.info("recorded evaluation %r of model #%d", split, model_id)
        return self.get(model_id)


class _ConflictError(Exception):
    """Internal: a conditional update found the state changed; the write transaction rolls back."""


def _check_fields(where: str, **fields: Any) -> None:
    for key, longest in (("name", NAME_MAX), ("version", VERSION_MAX)):
        if not isinstance(fields[key], str) or not fields[key].strip():
            raise InvalidArtifactError(f"{where}: {key} {fields[key]!r} must be a non-empty string")
        if len(fields[key]) > longest:
            raise InvalidArtifactError(
                f"{where}: {key} is {len(fields[key])} characters long; at most {longest}"
            )
    for key, allowed in (("task", TASKS), ("kind", KINDS), ("precision", PRECISIONS)):
        if fields[key] not in allowed:
            raise InvalidArtifactError(f"{where}: {key} {fields[key]!r} is not one of {', '.join(allowed)}")
    modalities = fields["modalities"]
    if isinstance(modalities, str) or not modalities or not all(isinstance(m, str) for m in modalities):
        raise InvalidArtifactError(f"{where}: modalities {modalities!r} must be a non-empty list of names")


def open_registry(url: str, *, migrate: bool = True, tolerance: float = DEFAULT_TOLERANCE) -> Registry:
    """A :class:`Registry` on the database at ``url``, upgraded to head first when ``migrate``."""
    if migrate:
        upgrade(url)
    return Registry(make_session_factory(make_engine(url)), tolerance=tolerance)
