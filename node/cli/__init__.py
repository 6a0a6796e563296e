"""The ``segnode`` command line: one Typer app, one module per command group.

Each module under :mod:`node.cli` exposes ``register(app)``; heavy imports (torch, openvino)
happen inside the commands so that ``segnode --help`` and the node never import torch.
"""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape

from node.cli import convert, dbcmd, models, nodecmd, traincmd

app = typer.Typer(
    name="segnode",
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
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


for _module in (convert, dbcmd, models, nodecmd, traincmd):
    _module.register(app)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input: shown as one line, no traceback."""
    from converters.exceptions import ConverterError
    from node.exceptions import NodeError

    errors: list[type[BaseException]] = [ConverterError, NodeError, FileNotFoundError]
    try:
        from db.exceptions import RegistryError

        errors.append(RegistryError)
    except ImportError:  # pragma: no cover - db not importable only during early development
        pass
    try:
        from trainer.exceptions import TrainerError

        errors.append(TrainerError)
    except ImportError:
        pass
    return tuple(errors)


def main() -> None:
    """Console-script entry point: run the app, turn known errors into one line and exit code 2."""
    try:
        app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("Aborted.")
        sys.exit(1)
    except Exception as exc:  # the one place that maps errors to exit codes
        try:  # typer >= 0.2x vendors click as typer._click; older typer uses click itself
            from typer._click.exceptions import ClickException
        except ImportError:  # pragma: no cover
            from click import ClickException  # type: ignore[no-redef]

        if isinstance(exc, ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if _state["debug"] or not isinstance(exc, _user_errors()):
            raise
        # escape: a message naming a config section ("[node] ...") is text, not Rich markup
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
