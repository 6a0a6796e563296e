"""End-of-run figures: learning curves and sample predictions (image, truth, prediction)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from converters.preprocess import PreprocessSpec
from trainer.data import PreparedCase

logger = logging.getLogger(__name__)


def plot_learning_curves(history: Sequence[Mapping[str, float]], path: Path) -> None:
    """Training loss, training batch Dice and validation Dice per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="training loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("Dice + cross-entropy")
    ax_loss.legend()
    ax_dice.plot(epochs, [h["train_dice"] for h in history], marker="o", label="training (slices)")
    ax_dice.plot(epochs, [h["val_dice"] for h in history], marker="o", label="validation (3D, per case)")
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("Dice")
    ax_dice.set_ylim(0, 1)
    ax_dice.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_samples(
    checkpoint: Path, cases: Sequence[PreparedCase], card: Mapping[str, Any], path: Path, rows: int = 4
) -> None:
    """For up to ``rows`` validation slices with the most tumour: image, truth and the model's prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from converters.prediction import outputs_to_labels, predict_slices
    from trainer.checkpoint import load_checkpoint, model_from_checkpoint
    from trainer.predictors import torch_predictor

    model = model_from_checkpoint(load_checkpoint(checkpoint))
    predict = torch_predictor(model)
    picks = []
    for case in cases:
        area = case.target_planes.reshape(len(case.target_planes), -1).sum(axis=1)
        picks.append((case, int(np.argmax(area))))
    picks = picks[:rows]
    fig, axes = plt.subplots(len(picks), 3, figsize=(9, 3 * len(picks)), squeeze=False)
    centre = PreprocessSpec.from_card(card["preprocessing"]).context_slices  # the first modality's own slice
    for row, (case, idx) in enumerate(picks):
        image = case.prepared.slices[idx : idx + 1]
        pred = outputs_to_labels(predict_slices(predict, image), card["output"])[0]
        for col, (title, data) in enumerate(
            [("image", image[0, centre]), ("truth", case.target_planes[idx]), ("prediction", pred)]
        ):
            ax = axes[row][col]
            ax.imshow(image[0, centre].T, cmap="gray", origin="lower")
            if col:
                ax.imshow(np.ma.masked_equal(data.T, 0), cmap="autumn", alpha=0.6, origin="lower")
            ax.set_title(f"{case.case_id} z={int(case.prepared.slice_indices[idx])} {title}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
