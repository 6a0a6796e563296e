"""The shipped models on a fresh install: imported and promoted when their task has none active.

Two tasks are bootstrapped: the node's segmentation task (``models/default``) and
``brain_extraction`` (``models/brain_extraction``), each with :func:`bootstrap_default_model`.

``segnode serve`` on a new ``SEGNODE_HOME`` would otherwise queue every study until an administrator
ran ``segnode models import`` and ``promote``. The container entrypoint has always done this; the node
now does it too (``[node] bootstrap_default_model``, on by default), in one log line and with the
promotion in the model table's audit trail. An administrator's choice is never undone: nothing happens
when the task already has an active model.
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
    if registry.active_id(task) is not None:
        return None
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
    try:
        info = install_and_promote(
            registry,
            model_dir,
            by="segnode serve",
            reason=f"shipped model; task {task} had no active model",
        )
    except (NodeError, RegistryError) as exc:
        logger.error("no active model for task %s; the shipped model at %s was not installed: %s",
                     task, model_dir, exc)
        return None
    logger.warning(
        "no active model for task %s: imported and promoted the shipped model %s from %s",
        task, info.label, model_dir,
    )
    return info
