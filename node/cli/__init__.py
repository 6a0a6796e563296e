"""The ``segnode`` command line: a thin root that loads each command group from its package, lazily.

Each group lives with the package it drives: :mod:`node.cli.commands` (serve, send, demo, jobs),
:mod:`trainer.cli` (train, export, evaluate), :mod:`converters.cli` (convert) and :mod:`db.cli`
(models, db). :data:`COMMANDS` names them; a group's module is imported only when its command runs
(:mod:`node.cli.lazy`), so ``segnode --help`` and the node never import torch, and a command whose
extra is missing says so in one line.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape

from node import LOG_FORMAT
from node.cli.lazy import CommandSpec, Extra, LazyGroup, MissingExtraError

#: What ``segnode train`` imports: the training loop, TensorBoard logs and the figures of a run.
TRAINING = Extra("train", ("torch", "tensorboard", "matplotlib"))
#: What ``segnode export`` imports: the checkpoint, ONNX export and check, NNCF quantization.
EXPORT = Extra("train", ("torch", "onnx", "onnxruntime", "nncf"))
#: What ``segnode export-brain-extractor`` imports: deepbet's networks, torch and the ONNX exporter.
BRAIN_EXPORT = Extra("train", ("torch", "onnx", "deepbet"))
#: What ``segnode requantize`` imports: NNCF (the FP32 IR is read by OpenVINO, no torch).
REQUANTIZE = Extra("train", ("nncf",))
#: What ``segnode ensemble`` imports: ONNX to merge the graphs and check them, NNCF to quantize.
ENSEMBLE = Extra("train", ("onnx", "onnxruntime", "nncf"))

#: name -> where the command lives, its one-line help (shown by ``segnode --help``), its extra.
#: ``evaluate`` needs no extra for OpenVINO IR models; it checks for torch or ONNX Runtime itself
#: when given a checkpoint or an ONNX file.
COMMANDS: dict[str, CommandSpec] = {
    "serve": CommandSpec(
        "node.cli.commands:serve",
        "Run the node: DICOM SCP, workers, sender, /metrics and /healthz, until SIGINT, SIGTERM or SIGHUP.",
    ),
    "send": CommandSpec(
        "node.cli.commands:send", "Send DICOM files over C-STORE (one association), with a progress bar."
    ),
    "demo": CommandSpec(
        "node.cli.commands:demo",
        "The whole clinical path on this machine: DICOM study in over C-STORE, SEG and SR back.",
    ),
    "train": CommandSpec(
        "trainer.cli:train", "Train a 2D U-Net (one device, or many under torchrun).", TRAINING
    ),
    "export": CommandSpec(
        "trainer.cli:export",
        "Export ONNX, OpenVINO IR FP32 and INT8, write model.json, and register the lineage.",
        EXPORT,
    ),
    "requantize": CommandSpec(
        "trainer.cli:requantize",
        "Quantize a model's FP32 IR to INT8 again (NNCF, overflow fix) as a new version, and register it.",
        REQUANTIZE,
    ),
    "ensemble": CommandSpec(
        "trainer.cli:ensemble",
        "Models of one split as one: the mean of their logits or probabilities, INT8, card, registered.",
        ENSEMBLE,
    ),
    "export-brain-extractor": CommandSpec(
        "trainer.cli:export_brain_extractor",
        "Convert deepbet's brain-extraction networks to OpenVINO IR, check them, write the model directory.",
        BRAIN_EXPORT,
    ),
    "evaluate": CommandSpec(
        "trainer.cli:evaluate",
        "Per-case 3D Dice, Jaccard, sensitivity, specificity, HD95 and volume error on labelled cases.",
    ),
    "crossval": CommandSpec(
        "trainer.cli:crossval",
        "Cross-validation: each fold's model scored on the cases it validated on, and the folds pooled.",
    ),
    "convert": CommandSpec(
        "converters.cli:convert_app",
        "Convert between NIfTI cases and DICOM MR studies; write synthetic Task01 folders.",
    ),
    "db": CommandSpec("db.cli:db_app", "The database: upgrade the schema, show its revision."),
    "models": CommandSpec(
        "db.cli:models_app",
        "The model table: list, show, import, promote, roll back, retire and verify models.",
    ),
    "jobs": CommandSpec(
        "node.cli.commands:jobs_app",
        "The node's job queue: list, show and retry jobs, dismiss refused sends or held results.",
    ),
}

#: Exception types (by name, so that nothing is imported up front) shown as one line and exit code 2.
USER_ERRORS: tuple[str, ...] = (
    "converters.exceptions:ConverterError",
    "db.exceptions:RegistryError",
    "node.exceptions:NodeError",
    "trainer.exceptions:TrainerError",
)


class SegnodeGroup(LazyGroup):
    """The root group of ``segnode``: the commands of :data:`COMMANDS`."""

    table = COMMANDS


app = typer.Typer(
    name="segnode",
    cls=SegnodeGroup,
    help="Brain-tumour segmentation node: DICOM in, DICOM SEG and SR out; and the trainer behind it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

err_console = Console(stderr=True)

_state = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level."),
) -> None:
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format=LOG_FORMAT)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input: shown as one line, no traceback."""
    errors: list[type[BaseException]] = [MissingExtraError, FileNotFoundError]
    for target in USER_ERRORS:
        module, _, attr = target.partition(":")
        with contextlib.suppress(ImportError):  # a package left out of this install
            errors.append(getattr(importlib.import_module(module), attr))
    return tuple(errors)


def main() -> None:
    """Console-script entry point: run the app, turn known errors into one line and exit code 2.

    Outside standalone mode a command's ``typer.Exit(code)`` comes back as the app's return value, not
    as an exception: that code is the process's exit code.
    """
    try:
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("Aborted.")
        sys.exit(1)
    except Exception as exc:  # the one place that maps errors to exit codes
        from typer._click.exceptions import ClickException

        if isinstance(exc, ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        # a missing extra is never a bug: one line even under --debug
        debug = _state["debug"] and not isinstance(exc, MissingExtraError)
        if debug or not isinstance(exc, _user_errors()):
            raise
        # escape: a message naming a config section ("[node] ...") is text, not Rich markup
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    if isinstance(code, int) and code:
        sys.exit(code)
