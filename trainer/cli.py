"""The trainer's commands: ``segnode train``, ``export``, ``requantize``, ``ensemble``, ``evaluate``,
``export-brain-extractor``.

The root app (:mod:`node.cli`) loads this module only when one of these commands runs, after
checking that the ``[train]`` extra is there for ``train`` and ``export``. ``evaluate`` of an
OpenVINO IR (a model directory, an ``.xml``, or a registered IR model) needs only the base install;
of a checkpoint it needs torch, of an ONNX file ONNX Runtime, and it says so in one line when they
are missing. torch, openvino and nncf are imported inside the commands.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from db.cli import CONFIG_OPTION, print_table

if TYPE_CHECKING:
    from trainer.evaluate import CardPredictor

console = Console()

#: Modules ``evaluate`` needs beyond the base install, per model form (an IR needs none).
EVALUATE_NEEDS: dict[str, tuple[str, ...]] = {"checkpoint": ("torch",), "onnx": ("onnxruntime",)}


def _parse_axes(text: str) -> list[int]:
    """``--slice-axes`` "0,1,2" -> [0, 1, 2]."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"--slice-axes {text!r} must be axes like 2 or 0,1,2") from None


def _parse_crop(text: str) -> list[int]:
    from trainer.exceptions import TrainerError

    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",") if p.strip()]
    except ValueError:
        raise TrainerError(f"--crop {text!r} is not a size like 192 or 192x160") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise TrainerError(f"--crop {text!r} is not a size like 192 or 192x160")
    return parts


def train(
    data: Path = typer.Option(
        ..., "--data", help="Decathlon Task01 folder, BraTS-style folder, or folder of those."
    ),
    out: Path = typer.Option(..., "--out", help="Run directory (checkpoints, logs, figures)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | hpu"),
    epochs: int = typer.Option(20, "--epochs"),
    task: str = typer.Option("whole_tumor", "--task", help="whole_tumor | brats_regions"),
    modalities: str = typer.Option("", "--modalities", help="Comma list; default FLAIR (regions: all four)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
    base_filters: int = typer.Option(16, "--base-filters"),
    depth: int = typer.Option(4, "--depth"),
    norm: str = typer.Option(
        "batch", "--norm", help="batch | instance | group (group: --base-filters 1, 2, 4 or a multiple of 8)."
    ),
    crop: str = typer.Option("192", "--crop", help="In-plane network input size, e.g. 192 or 176x160."),
    spacing: str = typer.Option(
        "", "--spacing", help="Target spacing mm 'x,y,z' (default: median of the data)."
    ),
    val_fraction: float = typer.Option(
        0.2, "--val-fraction", help="Share of patients held out for validation."
    ),
    seed: int = typer.Option(0, "--seed"),
    split_seed: int = typer.Option(
        -1,
        "--split-seed",
        help="Seed of the training / validation split (-1: --seed). Another --seed with the same "
        "--split-seed trains another network on the same split, e.g. an ensemble's members.",
    ),
    folds: int = typer.Option(
        0,
        "--folds",
        help="Cross-validation: cut the patients into this many parts, one validating "
        "(instead of --val-fraction; 0: no folds).",
    ),
    fold: int = typer.Option(0, "--fold", help="With --folds K: the part (0 to K-1) that validates."),
    slices_per_epoch: int = typer.Option(
        0, "--slices-per-epoch", help="0: as many as there are training slices."
    ),
    tumour_fraction: float = typer.Option(
        0.5,
        "--tumour-fraction",
        help="Share of sampled slices with tumour, in [0, 1] (0: drawn uniformly, 1: tumour slices only).",
    ),
    scanner_augment: float = typer.Option(
        0.0,
        "--scanner-augment",
        help="Per case and epoch, the chance of a scanner-like degradation (thick slices, bias, noise, "
        "contrast, rotation; trainer/scanner_augment.py). 0: off.",
    ),
    optional_modalities: str = typer.Option(
        "",
        "--optional-modalities",
        help="Comma list of modalities a case or study may lack (their channel is then zero), "
        "e.g. T1,T1GD,T2. Validation cases hold every modality.",
    ),
    channel_dropout: float = typer.Option(
        0.0,
        "--channel-dropout",
        help="Per training slice, the chance of zeroing a random subset of the optional modalities.",
    ),
    slice_axes: str = typer.Option(
        "2",
        "--slice-axes",
        help="Axes of the model's grid training slices are cut along: 2 (axial) or 0,1,2 (sagittal and "
        "coronal too: the card then asks the node for three views; needs an isotropic grid).",
    ),
    context_slices: int = typer.Option(
        0,
        "--context-slices",
        help="Neighbouring slices on each side given to the network with each slice (2.5D input): "
        "each modality's slices at offsets -k..k become 2k+1 channels; the node stacks them alike.",
    ),
    patience: int = typer.Option(
        10, "--patience", help="Early stopping after this many epochs without gain."
    ),
    min_epochs: int = typer.Option(
        1,
        "--min-epochs",
        help="First epoch that may become best.pt and count towards --patience (1: every epoch).",
    ),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on HPU, fp16 AMP on CUDA."),
    max_minutes: float = typer.Option(
        0.0, "--max-minutes", help="Stop before an epoch would pass this (0: none)."
    ),
    threads: int = typer.Option(0, "--threads", help="CPU threads (0: all cores)."),
    name: str = typer.Option("", "--name", help="Model name for the card."),
    version: str = typer.Option("0.1.0", "--version"),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from its last checkpoint."
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace the run already in --out (its checkpoints, run.json, metrics.csv and TensorBoard "
        "events are deleted). Without it, or --resume, a run there is refused.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a 2D U-Net (one device, or many under torchrun)."""
    from trainer.train import TrainConfig
    from trainer.train import train as run_training

    mods = [m.strip().upper() for m in modalities.split(",") if m.strip()]
    if not mods:
        mods = ["FLAIR"] if task == "whole_tumor" else ["FLAIR", "T1", "T1GD", "T2"]
    config = TrainConfig(
        # Absolute (symlinks kept, so that a path through a holdout folder is still seen as one):
        # export and evaluation of the run read its data from run.json from any working directory.
        data=os.path.abspath(data),
        out=os.path.abspath(out),
        task=task,
        modalities=mods,
        device=device,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        base_filters=base_filters,
        depth=depth,
        norm=norm,
        crop_size=_parse_crop(crop),
        spacing_mm=[float(s) for s in spacing.split(",")] if spacing else None,
        val_fraction=val_fraction,
        seed=seed,
        split_seed=None if split_seed < 0 else split_seed,
        folds=folds,
        fold=fold,
        slices_per_epoch=slices_per_epoch or None,
        tumour_fraction=tumour_fraction,
        scanner_augment=scanner_augment,
        optional_modalities=[m.strip().upper() for m in optional_modalities.split(",") if m.strip()],
        channel_dropout=channel_dropout,
        slice_axes=_parse_axes(slice_axes),
        context_slices=context_slices,
        patience=patience,
        min_epochs=min_epochs,
        amp=amp,
        max_minutes=max_minutes or None,
        threads=threads or None,
        name=name,
        version=version,
    )
    summary = run_training(config, resume=resume, progress=progress, overwrite=overwrite)
    console.print(
        f"trained {summary['epoch']} epochs; best validation Dice {summary['best_dice']:.4f} "
        f"at epoch {summary['best_epoch']}; run in {out}"
    )


#: ``--max-false-tumour-ratio`` of export and requantize; the default is
#: trainer.false_tumour.DEFAULT_MAX_RATIO (not imported: the CLI starts without scipy).
FALSE_TUMOUR_RATIO_OPTION = typer.Option(
    1.25,
    "--max-false-tumour-ratio",
    help="Fail the INT8 model if its false tumour (beyond the label, on the split's cases as they are "
    "and mirrored tumour-free) exceeds this many times the FP32 IR's, plus 2 mL; negative: no check.",
)


def export(
    run_dir: Path = typer.Argument(..., help="A training run directory (with best.pt)."),
    out: Path = typer.Option(
        None, "--out", help="Where to write the model directory (default RUN_DIR/export)."
    ),
    calibration_size: int = typer.Option(
        300, "--calibration-size", help="INT8 calibration slices (training split)."
    ),
    max_dice_drop: float = typer.Option(
        -1.0,
        "--max-dice-drop",
        help="Use NNCF accuracy control with this absolute Dice drop (validation split).",
    ),
    max_false_tumour_ratio: float = FALSE_TUMOUR_RATIO_OPTION,
    checkpoint: str = typer.Option("best.pt", "--checkpoint", help="Checkpoint file in RUN_DIR."),
    data: Path = typer.Option(None, "--data", help="Training data folder, if it moved since training."),
    include_checkpoint: bool = typer.Option(True, "--with-checkpoint/--no-checkpoint"),
    fp16_weights: bool = typer.Option(False, "--fp16-weights", help="Store IR FP32 weights as FP16."),
    register_models: bool = typer.Option(
        True, "--register/--no-register", help="Import into the model table."
    ),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Export ONNX, OpenVINO IR FP32 and INT8, write model.json, and register the lineage."""
    from db.url import resolve_database_url
    from trainer.exceptions import AccuracyCheckError
    from trainer.export import ExportOptions, export_run

    database_url = resolve_database_url(config) if register_models else None
    options = ExportOptions(
        run_dir=run_dir,
        out_dir=out,
        checkpoint=checkpoint,
        data=data,
        calibration_size=calibration_size,
        max_dice_drop=max_dice_drop if max_dice_drop >= 0 else None,
        max_false_tumour_ratio=_ratio_or_none(max_false_tumour_ratio),
        include_checkpoint=include_checkpoint,
        fp16_weights=fp16_weights,
        register=register_models,
        database_url=database_url,
    )
    try:
        with console.status("exporting") as status:
            card = export_run(options, on_step=lambda msg: status.update(msg))
    except AccuracyCheckError as exc:
        _print_export_table(exc.card)  # what failed, before the one-line error
        _print_false_tumour(exc.card)
        raise
    _print_export_table(card)
    _print_false_tumour(card)
    where = out or run_dir / "export"
    console.print(f"model directory {where}" + _registered(card))


def _registered(card: dict[str, Any]) -> str:
    """"; registered models [ids] in DATABASE" for an export or requantize that registered, else ""."""
    ids = card.get("registered_ids")
    return f"; registered models {ids} in {card.get('registered_in', 'the model table')}" if ids else ""


def _ratio_or_none(ratio: float) -> float | None:
    """``--max-false-tumour-ratio``: a negative ratio turns the check off."""
    return ratio if ratio >= 0 else None


def _print_false_tumour(card: dict[str, Any]) -> None:
    """One line: the INT8 model's false tumour against the FP32 IR's (``calibration.false_tumour_check``)."""
    check = card.get("calibration", {}).get("false_tumour_check")
    if check is not None and "skipped" in check:
        console.print(f"false tumour not checked: {check['skipped']}")
    elif check is not None:
        verdict = "passed" if check["passed"] else "FAILED"
        console.print(
            f"false tumour beyond the label, {check['volumes']} volumes: FP32 {check['fp32_ml']:.1f} mL, "
            f"INT8 {check['int8_ml']:.1f} mL (limit {check['limit_ml']:.1f} mL): {verdict}"
        )


def _print_export_table(card: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{card['name']} {card['version']} (validation cases)")
    regions = list(card["artifacts"][-1].get("metrics", {}).get("regions", {}))
    for col in ("artifact", "precision", "Dice", "HD95 mm", *(f"{r} Dice" for r in regions)):
        table.add_column(col)
    for art in card["artifacts"]:
        mean = art.get("metrics", {}).get("mean", {})
        by_region = art.get("metrics", {}).get("regions", {})
        table.add_row(
            art["key"],
            art["precision"],
            f"{mean.get('dice', float('nan')):.4f}",
            f"{mean.get('hd95', float('nan')):.2f}",
            *(f"{by_region.get(r, {}).get('dice', float('nan')):.4f}" for r in regions),
        )
    print_table(table, console)


def requantize(
    model_dir: Path = typer.Argument(..., help="An exported model directory (model.json, FP32 IR)."),
    out: Path = typer.Option(..., "--out", help="Where to write the new version's model directory."),
    version: str = typer.Option(..., "--version", help="The new version (not the source's)."),
    data: Path = typer.Option(
        ..., "--data", help="The training data folder holding the card's training and validation cases."
    ),
    calibration_size: int = typer.Option(
        300, "--calibration-size", help="INT8 calibration slices (training split)."
    ),
    max_false_tumour_ratio: float = FALSE_TUMOUR_RATIO_OPTION,
    register_models: bool = typer.Option(
        True, "--register/--no-register", help="Import into the model table."
    ),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Quantize a model's FP32 IR to INT8 again (NNCF, overflow fix) as a new version, and register it."""
    from db.url import resolve_database_url
    from trainer.requantize import RequantizeOptions, requantize_dir

    options = RequantizeOptions(
        model_dir=model_dir,
        out_dir=out,
        version=version,
        data=data,
        calibration_size=calibration_size,
        max_false_tumour_ratio=_ratio_or_none(max_false_tumour_ratio),
        register=register_models,
        database_url=resolve_database_url(config) if register_models else None,
    )
    with console.status("quantizing") as status:
        card = requantize_dir(options, on_step=lambda msg: status.update(msg))
    from rich.table import Table

    old = card["requantized_from"]
    table = Table(title=f"{card['name']} {old['version']} -> {card['version']} (validation cases, this CPU)")
    regions = list(old.get("metrics_on_this_cpu", {}).get("regions", {}))
    for col in ("artifact", "precision", "Dice", *(f"{r} Dice" for r in regions)):
        table.add_column(col)
    rows = [(a["key"], a["precision"], a.get("metrics")) for a in card["artifacts"]]
    rows.append((f"ir_int8 of {old['version']}", "int8", old.get("metrics_on_this_cpu")))
    for key, precision, metrics in rows:
        if key not in ("checkpoint", "onnx"):
            found = metrics or {}
            by_region = found.get("regions", {})
            table.add_row(
                key,
                precision,
                _fmt(found.get("mean", {}).get("dice"), ".4f"),
                *(_fmt(by_region.get(r, {}).get("dice"), ".4f") for r in regions),
            )
    print_table(table, console)
    drop = card["calibration"].get("validation_dice_drop")
    console.print(f"INT8 Dice drop against FP32: {_fmt(drop, '+.4f')}")
    _print_false_tumour(card)
    console.print(f"model directory {out}" + _registered(card))


def ensemble(
    members: list[Path] = typer.Argument(
        ..., metavar="MODEL_DIR...", help="Two or more exported model directories trained on one split."
    ),
    out: Path = typer.Option(..., "--out", help="Where to write the ensemble's model directory."),
    version: str = typer.Option(..., "--version", help="The ensemble's version."),
    data: Path = typer.Option(
        ..., "--data", help="The training data folder holding the members' training and validation cases."
    ),
    name: str = typer.Option("", "--name", help="The ensemble's name (default: the members' name)."),
    combine: str = typer.Option(
        "logits",
        "--combine",
        help="Average the members' logits, or their probabilities (given back as logits).",
    ),
    calibration_size: int = typer.Option(
        300, "--calibration-size", help="INT8 calibration slices (training split)."
    ),
    max_dice_drop: float = typer.Option(
        -1.0,
        "--max-dice-drop",
        help="Use NNCF accuracy control with this absolute Dice drop (validation split; negative: off).",
    ),
    max_false_tumour_ratio: float = FALSE_TUMOUR_RATIO_OPTION,
    register_models: bool = typer.Option(
        True, "--register/--no-register", help="Import into the model table."
    ),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Models of one split as one: the mean of their logits or probabilities, INT8, card, registered."""
    from db.url import resolve_database_url
    from trainer.ensemble import EnsembleOptions, ensemble_dir

    options = EnsembleOptions(
        member_dirs=list(members),
        out_dir=out,
        version=version,
        data=data,
        name=name or None,
        combine=combine,
        calibration_size=calibration_size,
        max_dice_drop=max_dice_drop if max_dice_drop >= 0 else None,
        max_false_tumour_ratio=_ratio_or_none(max_false_tumour_ratio),
        register=register_models,
        database_url=resolve_database_url(config) if register_models else None,
    )
    with console.status("building the ensemble") as status:
        card = ensemble_dir(options, on_step=lambda msg: status.update(msg))
    from rich.table import Table

    table = Table(title=f"{card['name']} {card['version']}: members and ensemble (validation cases)")
    for col in ("model", "INT8 Dice"):
        table.add_column(col)
    for member in card["training"]["ensemble_of"]:
        label = f"{member['name']} {member['version']} (seed {member['seed']})"
        table.add_row(label, _fmt(member["int8_val_dice"], ".4f"))
    int8 = next(a for a in card["artifacts"] if a["key"] == "ir_int8")
    dice = (int8.get("metrics") or {}).get("mean", {}).get("dice")
    table.add_row("ensemble", _fmt(dice, ".4f"), style="bold")
    print_table(table, console)
    drop = card["calibration"].get("validation_dice_drop")
    console.print(f"INT8 Dice drop against FP32: {_fmt(drop, '+.4f')}")
    _print_false_tumour(card)
    console.print(f"model directory {out}" + _registered(card))


def export_brain_extractor(
    out_dir: Path = typer.Argument(..., help="Where to write the model directory (IR, model.json, NOTICE)."),
    data: Path = typer.Option(
        None,
        "--data",
        help="The shared data folder (dicom/, train/brats/): check the IR against the original there.",
    ),
    brats_limit: int = typer.Option(
        0, "--brats-limit", help="Check on the first N BraTS cases only (0: all)."
    ),
) -> None:
    """Convert deepbet's brain-extraction networks to OpenVINO IR, check them, write the model directory."""
    from trainer.brain_extractor_export import export_brain_extractor as run

    with console.status("exporting the brain extractor") as status:
        card = run(out_dir, data, brats_limit=brats_limit, on_step=lambda msg: status.update(msg))
    metrics = card["artifacts"][0].get("metrics")
    if not metrics:
        console.print(f"model directory {out_dir} (not checked: no --data, so no metrics)")
        return
    from rich.table import Table

    table = Table(title=f"{card['name']} {card['version']}: OpenVINO IR against the original TorchScript")
    for col in ("image", "net max |dp|", "mean |dp|", "mask Dice", "brain mL", "tumour in", "non-zero in"):
        table.add_column(col)
    for row in metrics["per_case"]:
        table.add_row(
            row["case"],
            f"{row['network_max_abs_diff']:.5f}",
            f"{row['mean_abs_prob_diff']:.6f}",
            f"{row['dice']:.4f}",
            f"{row['brain_volume_ml']:.0f}" if row["brain_volume_ml"] is not None else "no brain",
            f"{row['tumour_inside']:.4f}" if "tumour_inside" in row else "",
            f"{row['nonzero_inside']:.4f}" if "nonzero_inside" in row else "",
        )
    print_table(table, console)
    console.print(f"model directory {out_dir}; import with `segnode models import {out_dir}`")


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


#: The volume columns of the evaluation tables, as :func:`_volume_cells` fills them.
VOLUME_COLUMNS: tuple[str, ...] = ("pred mL", "true mL", "err mL", "|err| mL", "err %", "|err| %")

#: What the volume columns' mean row says: signed errors cancel between over- and under-segmented
#: cases, so their mean is a bias and the absolute errors' mean the typical error.
VOLUME_CAPTION = (
    "err: predicted - true volume, signed (in the mean row: the bias, over- and under-segmentation "
    "cancelling); |err|: absolute (in the mean row: the mean error); %: of the true volume"
)


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _volume_cells(m: dict[str, Any]) -> list[str]:
    """The :data:`VOLUME_COLUMNS` of one row (a case's or the mean's figures)."""
    return [
        _fmt(m.get("pred_volume_ml"), ".1f"),
        _fmt(m.get("true_volume_ml"), ".1f"),
        _fmt(m.get("volume_error_ml"), "+.1f"),
        _fmt(m.get("abs_volume_error_ml"), ".1f"),
        _fmt(_percent(m.get("volume_error_rel")), "+.1f"),
        _fmt(_percent(m.get("abs_volume_error_rel")), ".1f"),
    ]


def case_table(result: dict[str, Any], title: str) -> Any:
    """A Rich table of an evaluation's cases and their mean: Dice, Jaccard, sensitivity, specificity
    and HD95 (mm).

    Parameters
    ----------
    result:
        An evaluation result (:func:`trainer.evaluate.report`).
    title:
        The table's title (the model's description).
    """
    from rich.table import Table

    table = Table(title=title)
    table.add_column("case", no_wrap=True)
    for col in ("dice", "jaccard", "sensitivity", "specificity", "hd95 mm"):
        table.add_column(col, justify="right", overflow="fold")  # a number wraps, never loses digits

    def row(case: str, m: dict[str, Any], **style: Any) -> None:
        cells = [_fmt(m.get(n), ".4f") for n in ("dice", "jaccard", "sensitivity", "specificity")]
        table.add_row(case, *cells, _fmt(m.get("hd95"), ".2f"), **style)

    for c in result["cases"]:
        row(c["case"], c)
    row("mean", result["mean"], style="bold")
    return table


def volume_table(result: dict[str, Any], title: str) -> Any:
    """A Rich table of the tumour volume of each case and the mean: predicted and true mL, the error
    signed and absolute, in mL and % (see :data:`VOLUME_CAPTION`). A table of its own beside
    :func:`case_table`, whose columns would not fit beside these in a terminal.

    Parameters
    ----------
    result:
        An evaluation result (:func:`trainer.evaluate.report`), its cases with the volume figures.
    title:
        The table's title (the model's description).
    """
    from rich.table import Table

    table = Table(title=f"{title}: tumour volume", caption=VOLUME_CAPTION)
    table.add_column("case", no_wrap=True)
    for col in VOLUME_COLUMNS:
        table.add_column(col, justify="right", overflow="fold")
    for c in result["cases"]:
        table.add_row(c["case"], *_volume_cells(c))
    table.add_row("mean", *_volume_cells(result["mean"]), style="bold")
    return table


def region_table(regions: dict[str, Any], title: str) -> Any:
    """A Rich table of per-region results: each case and the mean, Dice, HD95 and volume error
    (signed and absolute, see :data:`VOLUME_CAPTION`).

    Parameters
    ----------
    regions:
        The ``regions`` block of an evaluation result (region -> ``{"cases", "mean"}``).
    title:
        The table's title (the model's description).
    """
    from rich.table import Table

    table = Table(title=f"{title}: regions", caption=VOLUME_CAPTION)
    table.add_column("case", no_wrap=True)
    table.add_column("region")
    for col in ("Dice", "HD95 mm", *VOLUME_COLUMNS):
        table.add_column(col, justify="right", overflow="fold")  # a number wraps, never loses digits

    def row(case: str, region: str, m: dict[str, Any], **style: Any) -> None:
        table.add_row(
            case, region, _fmt(m.get("dice"), ".4f"), _fmt(m.get("hd95"), ".2f"), *_volume_cells(m), **style
        )

    case_ids = [c["case"] for c in next(iter(regions.values()))["cases"]]
    for i, case_id in enumerate(case_ids):
        for name, block in regions.items():
            row(case_id, name, block["cases"][i])
    for name, block in regions.items():
        row("mean", name, block["mean"], style="bold")
    return table


def _require(kind: str) -> None:
    """Raise a one-line :class:`TrainerError` when evaluating a ``kind`` model needs a missing module."""
    from trainer.exceptions import TrainerError

    for module in EVALUATE_NEEDS.get(kind, ()):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            raise TrainerError(
                f"segnode evaluate of a{'n' if kind == 'onnx' else ''} {kind} needs the train extra "
                f"({module} not installed): pip install 'segnode[train]'"
            ) from None


def _kind_of_path(path: Path) -> str:
    suffix = path.suffix.lower()
    return "checkpoint" if suffix == ".pt" else "onnx" if suffix == ".onnx" else "ir"


def _load_registered(model_id: int, config: Path | None, device: str) -> tuple[CardPredictor, Any]:
    """The registered model ``model_id``, its files checked against their recorded checksums."""
    from db.cli import open_from_config
    from db.exceptions import ChecksumMismatch
    from trainer.evaluate import load_registered

    registry = open_from_config(config)  # a database that does not exist is refused, not created
    info = registry.get(model_id)
    report = registry.verify(model_id)
    if not report.ok:
        raise ChecksumMismatch(f"model #{model_id}: " + "; ".join(report.problems))
    _require(info.kind)
    suffix = {"checkpoint": ".pt", "onnx": ".onnx", "ir": ".xml"}[info.kind]
    path = info.file_with_suffix(suffix)
    loaded = load_registered(info.kind, info.precision, path, info.card or {}, device)
    loaded.description = f"model {info.label}: {loaded.description}"
    return loaded, registry


def evaluate(
    model: str = typer.Argument(
        ...,
        metavar="MODEL|ID",
        help="Checkpoint .pt, .onnx, IR .xml, a model directory, or a model id (see `segnode models list`).",
    ),
    data: Path = typer.Option(..., "--data", help="Labelled cases (any layout list_cases reads)."),
    precision: str = typer.Option("int8", "--precision", help="fp32 | int8, for a model directory."),
    json_out: Path = typer.Option(None, "--json", help="Write the per-case results as JSON."),
    device: str = typer.Option("CPU", "--ov-device", help="OpenVINO device for IR models."),
    batch_size: int = typer.Option(16, "--batch-size"),
    record: str = typer.Option(
        "",
        "--record",
        help="Record the result under this split name: in a model directory's model.json; for a model id "
        "in the model table (always recorded; default split: the data folder's name).",
    ),
    by: str | None = typer.Option(None, "--by", help="Who evaluated, recorded with a model id's result."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Per-case 3D Dice, Jaccard, sensitivity, specificity, HD95 and volume error on labelled cases.

    The tumour volume table holds each case's predicted and true volume and the error, signed and
    absolute, in mL and % (the mean row: the bias and the mean absolute error). For a
    ``brats_regions`` model that table is per region (WT, TC, ET), with each region's Dice and HD95;
    in the JSON under ``"regions"``.
    """
    from converters.nifti import list_cases
    from trainer.evaluate import evaluate_cases, load_model
    from trainer.exceptions import TrainerError

    model_id = int(model) if model.isdigit() else None
    path = Path(model)
    if model_id is None:
        _require(_kind_of_path(path))
    refs = list_cases(data, require_labels=True, allow_holdout=True)  # final evaluation may read it
    if not refs:
        raise TrainerError(f"no labelled case found under {data}")
    registry = None
    if model_id is not None:
        loaded, registry = _load_registered(model_id, config, device)
    else:
        loaded = load_model(path, precision, device)
    with console.status(f"evaluating {len(refs)} cases") as status:
        result = evaluate_cases(
            loaded, refs, batch_size, on_case=lambda cid, s: status.update(f"{cid}: Dice {s['dice']:.4f}")
        )
    print_table(case_table(result, loaded.description), console)
    if result.get("regions"):  # its WT rows hold the whole tumour's volumes
        print_table(region_table(result["regions"], loaded.description), console)
    else:
        print_table(volume_table(result, loaded.description), console)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        console.print(f"wrote {json_out}")
    from trainer.evaluate import evaluation_entry

    if registry is not None and model_id is not None:
        split = record or data.resolve().name
        registry.record_evaluation(model_id, evaluation_entry(result, split, data), by=by)
        console.print(f"recorded the {split} evaluation of model #{model_id} in the model table")
    elif record:
        if not path.is_dir():
            raise TrainerError(f"--record needs a model directory or a model id, not {path}")
        from db.card import record_evaluation

        record_evaluation(path, evaluation_entry(result, record, data))
        console.print(f"recorded the {record} evaluation in {path / 'model.json'}")


def crossval(
    models: list[Path] = typer.Argument(
        ..., metavar="MODEL_DIR...", help="One model directory per fold (segnode export of each fold's run)."
    ),
    data: Path = typer.Option(..., "--data", help="The labelled cases the folds were trained on."),
    precision: str = typer.Option("int8", "--precision", help="fp32 | int8."),
    json_out: Path = typer.Option(None, "--json", help="Write every case's figures and the means as JSON."),
    device: str = typer.Option("CPU", "--ov-device", help="OpenVINO device."),
    batch_size: int = typer.Option(16, "--batch-size"),
) -> None:
    """Cross-validation: each fold's model scored on the cases it validated on, and the folds pooled.

    Every case is scored once, by the one fold's model that did not train on it.

    Train the folds with ``segnode train --folds K --fold I`` (I = 0..K-1, one seed), export each,
    then pass the K model directories. The means are over all cases: K models' validation at once,
    a figure less swayed by one case than a single split's few validation cases.
    """
    from converters.nifti import list_cases
    from trainer.evaluate import evaluate_cases, fold_validation_sets, load_model, pool_folds
    from trainer.exceptions import TrainerError

    for path in models:
        if not path.is_dir():
            raise TrainerError(f"{path} is not a model directory (segnode export writes one per fold)")
    by_id = {r.case_id: r for r in list_cases(data, require_labels=True)}
    # Each fold by its directory's name, or by its path where two share a name (runs/f0/export, ...).
    names = [p.name for p in models]
    names = names if len(set(names)) == len(names) else [str(p) for p in models]
    folds = fold_validation_sets(models, names, by_id, data)
    results = []
    for path, fold, wanted in zip(models, names, folds, strict=True):
        loaded = load_model(path, precision, device)
        with console.status(f"{fold}: evaluating {len(wanted)} cases") as status:

            def show(case_id: str, scores: dict[str, Any], status: Any = status, name: str = fold) -> None:
                status.update(f"{name}: {case_id}: Dice {scores['dice']:.4f}")

            results.append(evaluate_cases(loaded, [by_id[c] for c in wanted], batch_size, on_case=show))
    pooled = pool_folds(results, names)
    title = f"cross-validation, {len(names)} folds, {precision}"
    shown = {**pooled, "cases": [{**c, "case": f"{c['case']} ({c['fold']})"} for c in pooled["cases"]]}
    print_table(case_table(shown, title), console)
    if pooled.get("regions"):
        regions = {
            region: {**block, "cases": [{**c, "case": f"{c['case']} ({c['fold']})"} for c in block["cases"]]}
            for region, block in pooled["regions"].items()
        }
        print_table(region_table(regions, title), console)
    else:
        print_table(volume_table(shown, title), console)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(pooled, indent=2) + "\n", encoding="utf-8")
        console.print(f"wrote {json_out}")
