"""The training loop: one or many devices, checkpoints each epoch, resume, best by validation Dice.

A run directory holds ``run.json`` (config, card base, data fingerprint), ``split.json``,
``last.pt`` and ``best.pt`` (self-describing checkpoints), ``metrics.csv``, TensorBoard events
under ``tensorboard/``, and at the end ``learning_curves.png`` and ``samples.png``. Under
``torchrun`` every rank trains on its shard of the epoch (DistributedSampler) and validates its
share of the validation cases; rank 0 alone writes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from converters.case import Case
from converters.prediction import outputs_to_labels, predict_card_views
from converters.preprocess import MAX_CONTEXT_SLICES, channels_per_modality, isotropic
from db.card import TASK_LABELS
from db.models import SEGMENTATION_TASKS as TASKS
from trainer.checkpoint import RUN_OPTION_DEFAULTS, RUN_OPTIONS, load_checkpoint, save_checkpoint
from trainer.data import (
    PreparedCase,
    SliceArrays,
    SliceDataset,
    epoch_plan,
    load_prepared,
    median_spacing,
    prepare_case,
    prepare_views,
    split_by_completeness,
)
from trainer.devices import DistInfo, dist_from_env, init_distributed, resolve_device
from trainer.exceptions import TrainerError, UnreadableCheckpointError
from trainer.losses import loss_for_task
from trainer.metrics import case_dice, dice
from trainer.predictors import torch_predictor
from trainer.scanner_augment import ScannerAugmentation, degrade_case
from trainer.unet import UNet2D, UNetConfig, build_unet

logger = logging.getLogger(__name__)

METRIC_FIELDS = ("epoch", "train_loss", "train_dice", "val_dice", "lr", "seconds", "slices_per_s")

#: What a run writes in its directory: ``--overwrite`` removes these (and nothing else) first.
RUN_FILES = (
    "run.json",
    "split.json",
    "last.pt",
    "best.pt",
    "last.pt.tmp",
    "best.pt.tmp",
    "metrics.csv",
    "learning_curves.png",
    "samples.png",
    "tensorboard",
)

#: Any of these in ``--out`` means it holds a run: a fresh run there is refused without --overwrite.
RUN_MARKERS = ("run.json", "last.pt", "best.pt", "metrics.csv")


@dataclass
class TrainConfig:
    """Options of ``segnode train`` (all JSON-serialisable; stored in run.json and checkpoints)."""

    data: str
    out: str
    task: str = "whole_tumor"
    modalities: list[str] = field(default_factory=lambda: ["FLAIR"])
    device: str = "auto"
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    base_filters: int = 16
    depth: int = 4
    norm: str = "batch"
    crop_size: list[int] = field(default_factory=lambda: [192, 192])
    spacing_mm: list[float] | None = None
    val_fraction: float = 0.2
    seed: int = 0
    slices_per_epoch: int | None = None
    tumour_fraction: float = 0.5
    patience: int = 10
    #: The first epoch that may be kept as best.pt and count towards ``patience``: a noisy validation
    #: score then cannot keep an almost untrained network, nor stop a run in its first epochs.
    min_epochs: int = 1
    amp: bool = True
    max_minutes: float | None = None
    threads: int | None = None
    name: str = ""
    version: str = "0.1.0"
    #: Per case and epoch, the probability of a scanner-like degradation (trainer/scanner_augment.py);
    #: 0 trains on the cases as they are. Validation then scores clean and degraded copies.
    scanner_augment: float = 0.0
    #: Modalities a case (and a study at the node) may lack: their channel is then all zero.
    optional_modalities: list[str] = field(default_factory=list)
    #: Per training slice, the probability of zeroing a random non-empty subset of the optional
    #: modalities' channels (never the required ones), so that the model tolerates their absence.
    channel_dropout: float = 0.0
    #: Axes of the model's grid that training slices are cut along: [2] (axial, the card's slice axis)
    #: or [0, 1, 2] (sagittal and coronal too, for a node running the model with three views;
    #: validation then scores the three views averaged, as the node computes them).
    slice_axes: list[int] = field(default_factory=lambda: [2])
    #: Neighbouring slices on each side given to the network with each slice (2.5D input: each
    #: modality's slices at offsets -k..k as channels; the card's ``preprocessing.context_slices``).
    context_slices: int = 0
    #: Cross-validation: the patients with every modality cut into ``folds`` parts (0: no folds, the
    #: split goes by ``val_fraction``), part ``fold`` validating (trainer/data.py ``split_cases``).
    folds: int = 0
    fold: int = 0
    #: The seed that shuffles the patients into training and validation; None: ``seed``. Another
    #: ``seed`` with the same ``split_seed`` trains another network on the same split (an ensemble's
    #: members, whose validation cases none of them saw).
    split_seed: int | None = None

    def check(self) -> None:
        """Raise TrainerError on an impossible option."""
        if self.task not in TASKS:
            raise TrainerError(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.task == "brats_regions" and len(self.modalities) != 4:
            logger.warning("brats_regions usually takes all four modalities; got %s", self.modalities)
        self.unet_config()  # depth, width and norm, before any case is preprocessed
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise TrainerError(f"--lr {self.lr} must be a positive number")
        multiple = 2**self.depth
        if len(self.crop_size) != 2 or any(c % multiple or c <= 0 for c in self.crop_size):
            raise TrainerError(
                f"crop size {self.crop_size} must be two positive multiples of 2**depth = {multiple}"
            )
        for name in ("epochs", "batch_size", "patience", "min_epochs"):
            if getattr(self, name) < 1:
                raise TrainerError(f"{name} {getattr(self, name)} must be at least 1")
        if self.min_epochs > self.epochs:
            raise TrainerError(f"--min-epochs {self.min_epochs} must not exceed --epochs {self.epochs}")
        if not 0.0 <= self.tumour_fraction <= 1.0:
            raise TrainerError(
                f"--tumour-fraction {self.tumour_fraction} must be a share in [0, 1] "
                "(0: slices drawn uniformly, 1: tumour slices only)"
            )
        if not 0.0 <= self.scanner_augment <= 1.0:
            raise TrainerError(f"--scanner-augment {self.scanner_augment} must be a probability in [0, 1]")
        unknown = [m for m in self.optional_modalities if m not in self.modalities]
        if unknown:
            raise TrainerError(
                f"--optional-modalities {', '.join(unknown)} not among "
                f"--modalities {', '.join(self.modalities)}"
            )
        if len(set(self.optional_modalities)) >= len(self.modalities):
            raise TrainerError("--optional-modalities must leave at least one modality required")
        if not 0.0 <= self.channel_dropout <= 1.0:
            raise TrainerError(f"--channel-dropout {self.channel_dropout} must be a probability in [0, 1]")
        if self.channel_dropout > 0 and not self.optional_modalities:
            raise TrainerError("--channel-dropout needs --optional-modalities (the channels it may zero)")
        if sorted(self.slice_axes) not in ([2], [0, 1, 2]):
            raise TrainerError(f"--slice-axes {self.slice_axes} must be 2 or 0,1,2")
        if not 0 <= self.context_slices <= MAX_CONTEXT_SLICES:
            raise TrainerError(f"--context-slices {self.context_slices} must be 0 to {MAX_CONTEXT_SLICES}")
        if self.context_slices and len(self.slice_axes) != 1:
            raise TrainerError("--context-slices needs slices along one axis (--slice-axes 2)")
        if self.folds == 1 or self.folds < 0:
            raise TrainerError(f"--folds {self.folds} must be 0 (no cross-validation) or at least 2")
        if not (0 <= self.fold < max(self.folds, 1)):
            raise TrainerError(
                f"--fold {self.fold} must be 0 to {self.folds - 1}" if self.folds
                else f"--fold {self.fold} needs --folds"
            )

    @property
    def channels_per_modality(self) -> int:
        """A modality's input channels: its slice and ``context_slices`` neighbours on each side."""
        return channels_per_modality(self.context_slices)

    def droppable_channels(self) -> list[tuple[int, ...]]:
        """The input channels channel dropout may zero: one group per optional modality, its slice and
        its context slices together (see :func:`trainer.data.drop_channels`)."""
        n = self.channels_per_modality
        return [tuple(range(i * n, (i + 1) * n))
                for i, m in enumerate(self.modalities) if m in self.optional_modalities]

    def unet_config(self) -> UNetConfig:
        """The network these options describe (raises TrainerError on an impossible one)."""
        return UNetConfig(
            in_channels=len(self.modalities) * self.channels_per_modality,
            out_channels=1 if self.task == "whole_tumor" else 4,
            base_filters=self.base_filters,
            depth=self.depth,
            norm=self.norm,
        )


def card_base(config: TrainConfig, spacing: Sequence[float]) -> dict[str, Any]:
    """The model-card fields fixed by training: task, modalities, preprocessing, output, labels."""
    default_name = "segnode-wt-" + "-".join(m.lower() for m in config.modalities)
    card: dict[str, Any] = {
        "format_version": 1,
        "name": config.name or (default_name if config.task == "whole_tumor" else "segnode-brats-regions"),
        "version": config.version,
        "task": config.task,
        "modalities": list(config.modalities),
        "preprocessing": {
            "orientation": "RAS",
            "spacing_mm": [float(s) for s in spacing],
            "crop_size": [int(c) for c in config.crop_size],
            "normalization": "zscore_nonzero",
            "slice_axis": 2,
            # A model trained on slices along the grid's three axes is run along them (predict_views).
            **({"views": 3} if len(config.slice_axes) == 3 else {}),
            # Neighbouring slices as channels (2.5D): the node stacks them the same way (with_context).
            **({"context_slices": config.context_slices} if config.context_slices else {}),
        },
        "output": {"activation": "sigmoid", "threshold": 0.5}
        if config.task == "whole_tumor"
        else {"activation": "softmax"},
        "labels": TASK_LABELS[config.task],
    }
    if config.optional_modalities:
        # The channels a study may lack: fed as all zeros (the brain's z-scored mean), as in training.
        card["optional_modalities"] = [m for m in config.modalities if m in config.optional_modalities]
    return card


def data_fingerprint(refs: Sequence[Any]) -> str:
    """sha256 over sorted case ids and the sha256 of each of their files."""
    digest = hashlib.sha256()
    for ref in sorted(refs, key=lambda r: r.case_id):
        digest.update(ref.case_id.encode())
        paths = [Path(ref.path), *([Path(ref.label_path)] if ref.label_path else [])]
        files = sorted(
            p for path in paths for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()
        )
        for f in files:
            digest.update(hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


def git_commit() -> str:
    """The current git commit of the working tree, or ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclass
class RunState:
    """What changes from epoch to epoch (saved in every checkpoint)."""

    epoch: int = 0
    best_dice: float = -1.0
    best_epoch: int = -1
    stale_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """Train a :class:`UNet2D` as ``config`` says, writing to ``config.out``.

    Parameters
    ----------
    config:
        The options.
    resume:
        Continue from ``out/last.pt`` (which must exist).
    progress:
        Show Rich progress bars (rank 0 only).
    overwrite:
        Replace a run already in ``out``: its files (:data:`RUN_FILES`) are removed once the data is
        prepared and the network built. Without it (or ``resume``) a run in ``out`` is refused.

    Raises
    ------
    TrainerError
        An impossible option, or ``out`` holds a run and neither ``resume`` nor ``overwrite`` is set.
    """

    def __init__(
        self, config: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False
    ) -> None:
        config.check()
        self.config = config
        self.out = Path(config.out)
        self.resume = resume
        self.overwrite = overwrite
        # Before init_distributed: no rank can have written into out yet when every rank checks.
        self._check_out_dir()
        self.dist: DistInfo = dist_from_env()
        self.progress = progress and self.dist.is_main
        self.device = resolve_device(config.device, self.dist.local_rank, config.amp, config.threads)
        init_distributed(self.dist, self.device.kind)
        self.state = RunState()
        self.started = time.monotonic()

    # -- set-up ---------------------------------------------------------------------------------------

    def _check_out_dir(self) -> None:
        """Refuse to start a fresh run on top of one in ``out`` (its checkpoints and run.json would be
        replaced and metrics.csv would mix both runs' epochs)."""
        if self.resume and self.overwrite:
            raise TrainerError("--resume and --overwrite exclude each other: continue the run, or replace it")
        if self.resume or self.overwrite:
            return
        found = [name for name in RUN_MARKERS if (self.out / name).exists()]
        if found:
            raise TrainerError(
                f"{self.out} already holds a training run ({', '.join(found)}): continue it with --resume, "
                "replace it with --overwrite (its checkpoints, metrics and TensorBoard events are deleted), "
                "or choose another --out"
            )

    def _clear_old_run(self) -> None:
        """``--overwrite``: remove the files of the run in ``out`` (other files there are left alone)."""
        removed = []
        for name in RUN_FILES:
            path = self.out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            else:
                continue
            removed.append(name)
        if removed:
            logger.info("--overwrite: removed %s from %s", ", ".join(removed), self.out)

    def _resumed_state(self) -> dict[str, Any] | None:
        if not self.resume:
            return None
        last = self.out / "last.pt"
        try:
            state = load_checkpoint(last)
        except UnreadableCheckpointError as exc:
            # No fallback to best.pt: it is an older epoch, and resuming from it would silently drop
            # the epochs after it from the run's history. The user chooses.
            best = self.out / "best.pt"
            raise TrainerError(
                f"--resume: the last checkpoint {last} cannot be read ({exc.reason}), so the run cannot "
                "continue from it: restore it from a copy, or start the run again with --overwrite"
                + (
                    f"; if {best.name} reads, the run's best model may still be exported or evaluated "
                    f"(segnode export {self.out} --checkpoint {best.name})"
                    if best.is_file()
                    else ""
                )
            ) from None
        saved = state["train_config"]
        for key in RUN_OPTIONS:
            used = saved.get(key, RUN_OPTION_DEFAULTS.get(key))
            if used != asdict(self.config).get(key):
                raise TrainerError(
                    f"--resume: option {key} is {asdict(self.config).get(key)!r} but the run in {self.out} "
                    f"used {used!r}"
                )
        return state

    def _check_resumed_data(self, saved: dict[str, Any], spacing: Sequence[float]) -> None:
        """The resumed run trains on the data and grid it started with (its card and lineage say so)."""
        saved_spacing = saved["card"]["preprocessing"]["spacing_mm"]
        if list(spacing) != list(saved_spacing):
            raise TrainerError(
                f"--resume: option spacing_mm is {list(spacing)!r} but the run in {self.out} used "
                f"{list(saved_spacing)!r}"
            )
        if self.fingerprint != saved["fingerprint"]:
            raise TrainerError(
                f"--resume: the cases under {self.config.data} are not the ones the run in {self.out} "
                "started with (their data fingerprint differs: cases added, removed or changed)"
            )

    def _prepare_data(self, saved: dict[str, Any] | None) -> None:
        from converters.nifti import list_cases

        refs = list_cases(Path(self.config.data), require_labels=True)
        if not refs:
            raise TrainerError(f"no labelled case found under {self.config.data}")
        split = (
            saved["split"]
            if saved
            else split_by_completeness(
                {r.case_id: r.channel_names for r in refs},
                self.config.modalities,
                self.config.optional_modalities,
                self.config.val_fraction,
                self.config.seed if self.config.split_seed is None else self.config.split_seed,
                self.config.folds,
                self.config.fold,
            )
        )
        spacing = self.config.spacing_mm or (
            saved["card"]["preprocessing"]["spacing_mm"] if saved else median_spacing(refs)
        )
        if not split["val"]:
            # best.pt and early stopping both go by validation Dice: without a validation case the
            # run would never write best.pt and would stop after `patience` epochs.
            raise TrainerError(
                f"validation fraction {self.config.val_fraction} leaves no validation case among "
                f"{len(refs)} case(s) under {self.config.data}: best.pt and early stopping need "
                "validation Dice (use --val-fraction > 0 and data of at least 2 patients)"
            )
        if len(self.config.slice_axes) > 1 and not isotropic(spacing):
            raise TrainerError(
                f"--slice-axes {self.config.slice_axes} needs an isotropic grid, not spacing "
                f"{list(spacing)} mm"
            )
        self.card = card_base(self.config, spacing)
        by_id = {r.case_id: r for r in refs}
        missing = [c for c in split["train"] + split["val"] if c not in by_id]
        if missing:
            raise TrainerError(
                f"--resume: case {missing[0]} of the saved split is not under {self.config.data}"
            )
        self.split = split
        self.fingerprint = data_fingerprint(refs)
        if saved:
            self._check_resumed_data(saved, spacing)
        pre, mods, task = self.card["preprocessing"], self.config.modalities, self.config.task
        optional = self.config.optional_modalities
        with self._bar("preprocessing", len(split["train"]) + len(split["val"])) as advance:
            train_cases = load_prepared(
                [by_id[c] for c in split["train"]], pre, mods, task, advance, optional, self.config.slice_axes
            )
            val_ids = split["val"][self.dist.rank :: self.dist.world_size]
            self.val_cases = load_prepared([by_id[c] for c in val_ids], pre, mods, task, advance)
        self.raw_train: list[Case] = []
        if self.config.scanner_augment > 0:
            self.raw_train = [_only(by_id[c].load(), mods) for c in split["train"]]
            self.val_cases += scanner_copies([by_id[c] for c in val_ids], pre, mods, task, self.config.seed)
        self.arrays = SliceArrays.from_cases(train_cases)
        self.tumour = self.arrays.tumour
        logger.info(
            "%d training slices (%d with tumour) from %d cases; %d validation cases on this rank",
            len(self.arrays.targets),
            int(self.tumour.sum()),
            len(train_cases),
            len(self.val_cases),
        )

    def _build(self, saved: dict[str, Any] | None) -> None:
        self.model_config = self.config.unet_config()
        torch.manual_seed(self.config.seed)
        self.model: UNet2D = self.device.place(build_unet(self.model_config))
        self.optimizer = self.device.optimizer(
            self.model.parameters(), self.config.lr, self.config.weight_decay
        )
        self.scaler = self.device.grad_scaler()
        if saved:
            self.model.load_state_dict(saved["model_state"])
            self.optimizer.load_state_dict(saved["optimizer_state"])
            if self.scaler is not None and saved.get("scaler_state"):
                self.scaler.load_state_dict(saved["scaler_state"])
            self.state = RunState(**saved["run_state"])
            logger.info("resuming after epoch %d (best Dice %.4f)", self.state.epoch, self.state.best_dice)
        self.net: torch.nn.Module = self.model
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.dist.local_rank] if self.device.kind == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.loss_fn = loss_for_task(self.config.task)

    def _write_run_files(self) -> None:
        if not self.dist.is_main:
            return
        if self.overwrite:
            self._clear_old_run()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "split.json").write_text(json.dumps(self.split, indent=2) + "\n")
        run = {
            "config": asdict(self.config),
            "card": self.card,
            "model_config": self.model_config.to_dict(),
            "fingerprint": self.fingerprint,
            "device_kind": self.device.kind,
            "device_count": self.dist.world_size,
            "commit": git_commit(),
        }
        (self.out / "run.json").write_text(json.dumps(run, indent=2) + "\n")

    # -- progress -------------------------------------------------------------------------------------

    @contextmanager
    def _bar(self, what: str, total: int, **fields: Any) -> Iterator[Callable[..., None]]:
        if not self.progress:
            yield lambda *a, **k: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        if fields:
            columns.append(TextColumn("loss {task.fields[loss]:.4f} dice {task.fields[dice]:.3f}"))
        with Progress(*columns, transient=False) as progress:
            task_id = progress.add_task(what, total=total, **fields)

            def advance(*_: Any, **kw: Any) -> None:
                progress.update(task_id, advance=1, **kw)

            yield advance

    # -- epochs ---------------------------------------------------------------------------------------

    def _lr(self, epoch: int) -> float:
        """Cosine decay from lr to 5 % of lr over the planned epochs."""
        frac = min(epoch / max(self.config.epochs, 1), 1.0)
        return self.config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    def _loader(self, epoch: int) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
        n = self.config.slices_per_epoch or len(self.arrays.targets)
        plan = epoch_plan(self.tumour, n, self.config.tumour_fraction, self.config.seed, epoch)
        dataset = SliceDataset(
            self.arrays,
            plan,
            augment_seed=self.config.seed * 100_003 + epoch,
            droppable=self.config.droppable_channels(),
            dropout=self.config.channel_dropout,
        )
        if self.dist.distributed:
            sampler: DistributedSampler[tuple[torch.Tensor, torch.Tensor]] = DistributedSampler(
                dataset,
                self.dist.world_size,
                self.dist.rank,
                shuffle=True,
                seed=self.config.seed,
                drop_last=True,
            )
            sampler.set_epoch(epoch)
            return DataLoader(dataset, self.config.batch_size, sampler=sampler, drop_last=True)
        generator = torch.Generator().manual_seed(self.config.seed * 7919 + epoch)
        return DataLoader(dataset, self.config.batch_size, shuffle=True, generator=generator, drop_last=True)

    def _degrade_epoch(self, epoch: int) -> None:
        """This epoch's training slices from freshly degraded copies of the training cases."""
        aug = ScannerAugmentation(prob=self.config.scanner_augment)
        pre, mods, task = self.card["preprocessing"], self.config.modalities, self.config.task
        cases = []
        with self._bar(f"scanner degradation, epoch {epoch + 1}", len(self.raw_train)) as advance:
            for i, case in enumerate(self.raw_train):
                rng = np.random.default_rng([self.config.seed, epoch, i])
                degraded = degrade_case(case, rng, aug)
                cases += prepare_views(
                    degraded, pre, mods, task, self.config.optional_modalities, self.config.slice_axes
                )
                advance()
        self.arrays = SliceArrays.from_cases(cases)
        self.tumour = self.arrays.tumour

    def _train_epoch(self, epoch: int) -> tuple[float, float, int]:
        if self.raw_train:
            self._degrade_epoch(epoch)
        self.net.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(epoch)
        loader = self._loader(epoch)
        losses, dices, seen = [], [], 0
        dev = self.device.device
        with self._bar(f"epoch {epoch + 1}/{self.config.epochs}", len(loader), loss=0.0, dice=0.0) as advance:
            for images, targets in loader:
                images, targets = images.to(dev, memory_format=self.device.memory_format), targets.to(dev)
                with self.device.autocast():
                    logits = self.net(images)
                loss = self.loss_fn(logits.float(), targets)
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.device.mark_step()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    loss.backward()
                    self.device.mark_step()
                    self.optimizer.step()
                self.device.mark_step()
                losses.append(float(loss.detach()))
                dices.append(self._batch_dice(logits.detach().float(), targets))
                seen += len(images)
                advance(loss=float(np.mean(losses)), dice=float(np.mean(dices)))
        return self._mean_across_ranks(float(np.mean(losses)), float(np.mean(dices)), seen)

    def _batch_dice(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        spec = self.card["output"]
        pred = outputs_to_labels(logits.cpu().numpy(), spec)
        return dice(pred > 0, targets.cpu().numpy() > 0)

    def _mean_across_ranks(self, loss: float, batch_dice: float, seen: int) -> tuple[float, float, int]:
        if not self.dist.distributed:
            return loss, batch_dice, seen
        import torch.distributed as dist

        t = torch.tensor([loss, batch_dice, float(seen)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0]) / self.dist.world_size, float(t[1]) / self.dist.world_size, int(t[2])

    def _validate(self) -> float:
        self.model.eval()
        predict = torch_predictor(self.model, self.device)
        scores = []
        for case in self.val_cases:
            # Along the card's views: three, averaged as the node computes them, after --slice-axes 0,1,2.
            outputs = predict_card_views(predict, case.prepared, self.card, max(self.config.batch_size, 16))
            scores.append(case_dice(outputs_to_labels(outputs, self.card["output"]), case, self.config.task))
        total, count = float(np.sum(scores)), float(len(scores))
        if self.dist.distributed:
            import torch.distributed as dist

            t = torch.tensor([total, count], dtype=torch.float64)
            dist.all_reduce(t)
            total, count = float(t[0]), float(t[1])
        return total / count if count else float("nan")

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "model_class": "UNet2D",
            "model_config": self.model_config.to_dict(),
            "model_state": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer_state": self.optimizer.state_dict(),
            "scaler_state": self.scaler.state_dict() if self.scaler is not None else None,
            "run_state": asdict(self.state),
            "train_config": asdict(self.config),
            "card": self.card,
            "split": self.split,
            "fingerprint": self.fingerprint,
            "device_kind": self.device.kind,
            "device_count": self.dist.world_size,
        }

    def _log_epoch(self, row: dict[str, float], writer: Any) -> None:
        path = self.out / "metrics.csv"
        new = not path.exists()
        with path.open("a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)
        if writer is not None:
            for key in ("train_loss", "train_dice", "val_dice", "lr", "slices_per_s"):
                writer.add_scalar(key, row[key], int(row["epoch"]))
            writer.flush()

    def _should_stop(self, epoch_seconds: list[float]) -> bool:
        stop = self.state.stale_epochs >= self.config.patience
        if stop:
            logger.info("early stopping: no validation improvement for %d epochs", self.state.stale_epochs)
        if self.config.max_minutes is not None and epoch_seconds:
            elapsed = time.monotonic() - self.started
            if elapsed + float(np.mean(epoch_seconds)) > self.config.max_minutes * 60:
                logger.info("stopping: another epoch would pass --max-minutes %.1f", self.config.max_minutes)
                stop = True
        if self.dist.distributed:
            import torch.distributed as dist

            t = torch.tensor([1.0 if stop else 0.0])
            dist.broadcast(t, src=0)
            stop = bool(t.item())
        return stop

    def run(self) -> dict[str, Any]:
        """Train until ``epochs``, early stopping or the time cap; returns a summary."""
        saved = self._resumed_state()
        self._prepare_data(saved)
        self._build(saved)
        self._write_run_files()
        writer = None
        if self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out / "tensorboard"))
        epoch_seconds: list[float] = []
        try:
            for epoch in range(self.state.epoch, self.config.epochs):
                t0 = time.monotonic()
                loss, train_dice, seen = self._train_epoch(epoch)
                val_dice = self._validate()
                seconds = time.monotonic() - t0
                epoch_seconds.append(seconds)
                row = {
                    "epoch": epoch + 1,
                    "train_loss": loss,
                    "train_dice": train_dice,
                    "val_dice": val_dice,
                    "lr": self._lr(epoch),
                    "seconds": seconds,
                    "slices_per_s": seen / seconds,
                }
                self.state.history.append(row)
                self.state.epoch = epoch + 1
                # before --min-epochs an epoch neither becomes best.pt nor counts towards --patience
                eligible = epoch + 1 >= self.config.min_epochs
                improved = eligible and val_dice > self.state.best_dice
                if improved:
                    self.state.best_dice, self.state.best_epoch, self.state.stale_epochs = (
                        val_dice,
                        epoch + 1,
                        0,
                    )
                elif eligible:
                    self.state.stale_epochs += 1
                if self.dist.is_main:
                    state = self._checkpoint_state()
                    # best.pt first: killed between the two writes, the run resumes from the previous
                    # last.pt with best.pt no older than the best epoch it records.
                    if improved:
                        save_checkpoint(state, self.out / "best.pt")
                    save_checkpoint(state, self.out / "last.pt")
                    self._log_epoch(row, writer)
                logger.info(
                    "epoch %d: loss %.4f, train Dice %.3f, val Dice %.4f (%.0f s)",
                    epoch + 1,
                    loss,
                    train_dice,
                    val_dice,
                    seconds,
                )
                if self._should_stop(epoch_seconds):
                    break
        finally:
            if writer is not None:
                writer.close()
        if self.dist.is_main:
            from trainer.plots import plot_learning_curves, plot_samples

            plot_learning_curves(self.state.history, self.out / "learning_curves.png")
            best = self.out / "best.pt"
            if self.state.best_epoch < 0:
                # the time cap (or an interrupted resume) ended the run before --min-epochs
                logger.warning(
                    "no best.pt: the run stopped after epoch %d, before --min-epochs %d; export "
                    "last.pt with `segnode export %s --checkpoint last.pt`, or --resume to go on",
                    self.state.epoch,
                    self.config.min_epochs,
                    self.out,
                )
            if best.exists() and self.val_cases:
                plot_samples(best, self.val_cases, self.card, self.out / "samples.png")
        if self.dist.distributed:
            import torch.distributed as dist

            dist.barrier()
        return {"out": str(self.out), **asdict(self.state)}


def _only(case: Case, modalities: Sequence[str]) -> Case:
    """``case`` with the images of ``modalities`` only (degradation works on every image it holds)."""
    return replace(case, images={m: case.images[m] for m in modalities if m in case.images})


def scanner_copies(
    refs: Sequence[Any], preprocessing: Mapping[str, Any], modalities: Sequence[str], task: str, seed: int
) -> list[PreparedCase]:
    """Validation cases degraded once, with a fixed seed, as a scanner would have written them."""
    out = []
    for i, ref in enumerate(refs):
        case = degrade_case(
            _only(ref.load(), modalities),
            np.random.default_rng([seed, 10_007, i]),
            ScannerAugmentation(prob=1.0),
        )
        prepared = prepare_case(case, preprocessing, modalities, task)
        out.append(replace(prepared, case_id=f"{prepared.case_id}+scanner"))
    return out


def train(
    config: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Train as ``config`` says (see :class:`Trainer`); returns the run state as a dict."""
    return Trainer(config, resume=resume, progress=progress, overwrite=overwrite).run()
