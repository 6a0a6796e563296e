"""The shipped models on a fresh install: imported and promoted when their task has none active.

Two tasks are bootstrapped: the node's segmentation task (``models/default``) and
``brain_extraction`` (``models/brain_extraction``), each with :func:`bootstrap_default_model`.

``segnode serve`` on a new ``SEGNODE_HOME`` would otherwise queue every study until an administrator
ran ``segnode models import`` and ``promote``. The container entrypoint has always done this; the node
now does it too (``[node] bootstrap_default_model``, on by default), in one log line and with the
promotion in the model table's audit trail. An administrator's choice is never undone: nothing happens
when the task already has an active model, with one exception, the image upgrade. The shipped model's
files live in the image and the model table in a volume, so a new image replaces the files of the
active row under it: that row's files no longer match their sha256 and the node refuses to serve it,
with nothing else to fall back on. When the active model's files are in the shipped folder and no
longer verify, while the folder now holds a model card of another version, that version is imported
and promoted (:func:`upgrade_shipped_model`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from db.exceptions import PromotionRefused, RegistryError
from db.registry import ModelInfo, Registry
from node.exceptions import NodeError

logger = logging.getLogger(__name__)

#: The shipped default model of a source checkout or editable install (``models/default``).
SHIPPED_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "default"
#: The shipped brain extractor (task ``brain_extraction``), bootstrapped the same way.
SHIPPED_BRAIN_EXTRACTOR_DIR = Path(__file__).resolve().parents[1] / "models" / "brain_extraction"


def install_and_promote(registry: Registry, model_dir: Path, *, by: str, reason: str) -> ModelInfo:
    """Import a model directory (idempotent) and promote its INT8 IR, else its FP32 IR.

    Raises
    ------
    NodeError
        The directory has no ``model.json``, lists no OpenVINO IR, or every IR was refused promotion
        (the message gives each refusal).
    """
    if not (model_dir / "model.json").is_file():
        raise NodeError(
            f"no model at {model_dir} (model.json missing): the shipped model is not there yet; "
            "train and export one (segnode train / segnode export) or pass --model DIR"
        )
    infos = registry.import_dir(model_dir, by=by)
    irs = sorted((i for i in infos if i.kind == "ir"), key=lambda i: i.precision != "int8")
    if not irs:
        raise NodeError(f"{model_dir}/model.json lists no OpenVINO IR artifact; the node runs only IR models")
    problems = []
    for info in irs:
        try:
            return registry.promote(info.id, by=by, reason=reason)
        except PromotionRefused as exc:
            problems.append(str(exc))
    raise NodeError("; ".join(problems))


def _install_shipped(registry: Registry, model_dir: Path, reason: str, what: str) -> ModelInfo | None:
    """:func:`install_and_promote` for the node itself; a failure is logged (``what`` first), not raised."""
    try:
        return install_and_promote(registry, model_dir, by="segnode serve", reason=reason)
    except (NodeError, RegistryError) as exc:
        logger.error("%s; the shipped model at %s was not installed: %s", what, model_dir, exc)
        return None


def _card_task(card: Path) -> str | None:
    """The ``task`` of a model card, or None when the card cannot be read."""
    try:
        task = json.loads(card.read_text(encoding="utf-8")).get("task")
    except (OSError, ValueError, AttributeError):
        return None
    return task if isinstance(task, str) else None


def bootstrap_default_model(registry: Registry, task: str, model_dir: Path) -> ModelInfo | None:
    """Promote the shipped model when ``task`` has no active model; returns what was promoted.

    Never raises for a model that cannot be installed: the node still serves (studies wait queued, as
    before) and the reason is logged once.
    """
    active = registry.active(task)
    if active is not None:
        return upgrade_shipped_model(registry, active, model_dir)
    card = model_dir / "model.json"
    if not card.is_file():
        logger.warning("no active model for task %s and no shipped model at %s", task, model_dir)
        return None
    shipped_task = _card_task(card)
    if shipped_task != task:
        logger.warning(
            "no active model for task %s; the shipped model at %s is for task %r",
            task, model_dir, shipped_task,
        )
        return None
    reason = f"shipped model; task {task} had no active model"
    info = _install_shipped(registry, model_dir, reason, f"no active model for task {task}")
    if info is None:
        return None
    logger.warning(
        "no active model for task %s: imported and promoted the shipped model %s from %s",
        task, info.label, model_dir,
    )
    return info


def _shipped_version(model_dir: Path) -> tuple[str | None, str | None]:
    """``(task, version)`` of the model card in ``model_dir``, or Nones when it cannot be read."""
    try:
        card = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    if not isinstance(card, dict):
        return None, None
    task, version = card.get("task"), card.get("version")
    return (task if isinstance(task, str) else None), (str(version) if version is not None else None)


def upgrade_shipped_model(registry: Registry, active: ModelInfo, model_dir: Path) -> ModelInfo | None:
    """Promote the model now shipped in ``model_dir`` when ``active`` is an earlier shipped model whose
    files a new image replaced (they are in ``model_dir`` and no longer verify); returns what was
    promoted, None when nothing is to be done (an administrator's own model, or files that verify).
    """
    try:
        shipped_dir = model_dir.resolve()
    except OSError:
        return None
    if not active.files or not all(f.path.resolve().parent == shipped_dir for f in active.files):
        return None  # not the shipped model: the administrator's choice stands
    if registry.verify(active.id).ok:
        return None
    task, version = _shipped_version(model_dir)
    if task != active.task or version is None or version == active.version:
        logger.error(
            "the active model %s of task %s has files in %s that no longer match the model table, and "
            "that folder holds no other version of the task to promote: the node cannot serve it; "
            "promote a model (segnode models list / promote)",
            active.label, active.task, model_dir,
        )
        return None
    info = _install_shipped(
        registry,
        model_dir,
        f"shipped model upgraded with the image: {active.version} -> {version}",
        f"the shipped model {version} (an image upgrade)",
    )
    if info is None:
        return None
    logger.warning(
        "the image replaced the shipped model of task %s: %s (its files no longer match) -> %s promoted",
        active.task, active.label, info.label,
    )
    return info
