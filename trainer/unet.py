"""A 2D U-Net: configurable depth and width, normalisation layers, transposed-convolution upsampling."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from trainer.exceptions import TrainerError

NORMS = ("batch", "instance", "group")


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild a :class:`UNet2D` (stored in checkpoints).

    Attributes
    ----------
    in_channels:
        Input modalities.
    out_channels:
        1 for a sigmoid whole-tumour output, 4 for softmax BraTS regions.
    base_filters:
        Filters of the first level; doubled at each pooling.
    depth:
        Number of poolings (the input size must be divisible by 2**depth).
    norm:
        ``batch``, ``instance`` or ``group`` normalisation after each convolution; ``group`` splits a
        level's channels into min(8, channels) groups, so every level's width must divide evenly.
    dropout:
        Dropout probability at the bottleneck.
    """

    in_channels: int = 1
    out_channels: int = 1
    base_filters: int = 16
    depth: int = 4
    norm: str = "batch"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise TrainerError(f"U-Net norm {self.norm!r} is not one of {', '.join(NORMS)}")
        if not 1 <= self.depth <= 6:
            raise TrainerError(f"U-Net depth {self.depth} must be between 1 and 6")
        if self.base_filters < 1 or self.in_channels < 1 or self.out_channels < 1:
            raise TrainerError(f"U-Net sizes must be positive: {self}")
        if self.norm == "group":
            for level in range(self.depth + 1):
                channels = self.base_filters * 2**level
                if channels % min(8, channels):
                    raise TrainerError(
                        f"U-Net norm 'group' with {self.base_filters} base filters: level {level} has "
                        f"{channels} channels, not divisible into min(8, {channels}) groups "
                        "(base filters 1, 2, 4 or a multiple of 8 fit)"
                    )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON and ``torch.load(weights_only=True)`` friendly)."""
        return asdict(self)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.GroupNorm(min(8, channels), channels)


class ConvBlock(nn.Sequential):
    """Two (3x3 convolution, normalisation, ReLU) layers."""

    def __init__(self, in_ch: int, out_ch: int, norm: str) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            _norm(norm, out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            _norm(norm, out_ch),
            nn.ReLU(inplace=True),
        )


class UNet2D(nn.Module):
    """The 2D U-Net of Ronneberger et al. (2015) with normalisation layers; outputs logits.

    Parameters
    ----------
    config:
        Sizes and normalisation (:class:`UNetConfig`).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.base_filters * 2**i for i in range(config.depth + 1)]
        self.down = nn.ModuleList()
        in_ch = config.in_channels
        for w in widths[:-1]:
            self.down.append(ConvBlock(in_ch, w, config.norm))
            in_ch = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ConvBlock(widths[-2], widths[-1], config.norm)
        self.dropout = nn.Dropout2d(config.dropout) if config.dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(w * 2, w, kernel_size=2, stride=2))
            self.up_blocks.append(ConvBlock(w * 2, w, config.norm))
        self.head = nn.Conv2d(widths[0], config.out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, out_channels, H, W) for input (N, in_channels, H, W)."""
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.bottleneck(x))
        for up, block, skip in zip(self.up, self.up_blocks, reversed(skips), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        out: torch.Tensor = self.head(x)
        return out


def build_unet(config: dict[str, Any] | UNetConfig) -> UNet2D:
    """A fresh :class:`UNet2D` from a config or its dict form (as stored in checkpoints)."""
    if isinstance(config, dict):
        try:
            config = UNetConfig(**config)
        except TypeError as exc:
            raise TrainerError(f"U-Net config {config!r} is invalid: {exc}") from None
    return UNet2D(config)
