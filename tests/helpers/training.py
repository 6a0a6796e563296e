"""A training run small enough for a test: tiny U-Net, 48 x 48 crops, a few epochs on one thread."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_config(data: Path, out: Path, **overrides: Any) -> Any:
    """A ``trainer.train.TrainConfig`` for ``data`` into ``out``: 2 epochs, base 8, depth 3, crop 48,
    40 % of the patients validating, CPU, one thread; ``overrides`` replace any of these."""
    from trainer.train import TrainConfig

    settings: dict[str, Any] = dict(
        data=str(data),
        out=str(out),
        device="cpu",
        epochs=2,
        batch_size=8,
        base_filters=8,
        depth=3,
        crop_size=[48, 48],
        val_fraction=0.4,
        threads=1,
        lr=3e-3,
    )
    settings.update(overrides)
    return TrainConfig(**settings)
