"""Losses: soft Dice + BCE for the sigmoid whole-tumour output, soft Dice + CE for softmax regions."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the batch, per channel then averaged; ``probs`` and ``target`` (N, K, H, W)."""
    dims = (0, 2, 3)
    inter = (probs * target).sum(dims)
    denom = probs.sum(dims) + target.sum(dims)
    return 1.0 - ((2.0 * inter + eps) / (denom + eps)).mean()


class DiceBCELoss(nn.Module):
    """Soft Dice + binary cross-entropy on logits (N, 1, H, W) against a {0, 1} target (N, H, W)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The summed loss."""
        t = target.unsqueeze(1).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, t)
        return bce + soft_dice_loss(torch.sigmoid(logits), t)


class DiceCELoss(nn.Module):
    """Soft Dice (foreground classes) + cross-entropy on logits (N, K, H, W), target labels (N, H, W)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The summed loss."""
        ce = F.cross_entropy(logits, target.long())
        probs = torch.softmax(logits, dim=1)
        onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
        return ce + soft_dice_loss(probs[:, 1:], onehot[:, 1:])


def loss_for_task(task: str) -> nn.Module:
    """The loss used for ``task``."""
    return DiceBCELoss() if task == "whole_tumor" else DiceCELoss()
