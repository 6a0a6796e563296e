"""Self-describing checkpoints: model class and config, optimizer and scaler state, epoch, history.

Checkpoints hold only tensors and plain Python containers, so they load with
``torch.load(weights_only=True)`` (no pickled classes, no code execution on load).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from trainer.exceptions import TrainerError, UnreadableCheckpointError
from trainer.unet import UNet2D, build_unet

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "segnode-checkpoint-1"
#: The options that ``segnode train --resume`` refuses to change (trainer/train.py ``_resumed_state``)
#: and ``segnode export`` checks (trainer/export.py ``check_checkpoint``): with the data fingerprint,
#: the split and the network they identify a run across its checkpoints.
RUN_OPTIONS = (
    "task",
    "modalities",
    "base_filters",
    "depth",
    "norm",
    "crop_size",
    "seed",
    "val_fraction",
    "optional_modalities",
    "slice_axes",
    "context_slices",
    "folds",
    "fold",
    "split_seed",
)
#: What a run saved before an option existed used (its value is then taken as this on --resume).
RUN_OPTION_DEFAULTS: dict[str, Any] = {
    "slice_axes": [2],
    "context_slices": 0,
    "folds": 0,
    "fold": 0,
    "split_seed": None,
}


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``.

    Raises
    ------
    UnreadableCheckpointError
        The file exists but cannot be read (damaged, or not a PyTorch file).
    TrainerError
        The file is missing or not a segnode checkpoint.
    """
    if not path.is_file():
        raise TrainerError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        others = sorted(p.name for p in path.parent.glob("*.pt") if p.name != path.name)
        reason = _reason(exc)
        raise UnreadableCheckpointError(
            f"checkpoint {path} cannot be read ({reason}): the file is damaged (truncated or "
            "overwritten, e.g. by a full disk or a partial copy) or is not a PyTorch checkpoint; restore it "
            "from a copy"
            + (f", or use another checkpoint of the run ({', '.join(others)})" if others else ""),
            reason,
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise TrainerError(f"checkpoint {path}: format {found!r} is not {CHECKPOINT_FORMAT!r}")
    return state


def _reason(exc: Exception) -> str:
    """One short line of what torch said (its messages run to paragraphs, some with advice to load with
    ``weights_only=False``, which would execute code from a file that is not trusted)."""
    lines = str(exc).strip().splitlines()
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    if len(first) > 120:
        first = first[:117] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def model_from_checkpoint(state: dict[str, Any]) -> UNet2D:
    """Rebuild the network of a checkpoint and load its weights (eval mode, CPU)."""
    if state.get("model_class") != "UNet2D":
        raise TrainerError(f"checkpoint model class {state.get('model_class')!r} is not 'UNet2D'")
    model = build_unet(state["model_config"])
    model.load_state_dict(state["model_state"])
    model.eval()
    return model
