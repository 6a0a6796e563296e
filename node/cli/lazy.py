"""Command groups loaded by name, only when they run (the pattern of MONAI Deploy's CLI).

The root ``segnode`` app knows each command by a table row: where it lives (``"module:attr"``), its
one-line help, and the extra it needs. ``segnode --help`` lists the rows without importing anything;
running a command (or asking for its ``--help``) first checks that its extra is installed, then
imports its module. So the node image, which has no ``[train]`` extra, answers ``segnode train`` with
one line naming the extra instead of a ``ModuleNotFoundError`` traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, ClassVar

import typer
from typer import _click
from typer.core import TyperCommand, TyperGroup


class MissingExtraError(Exception):
    """A command needs an optional dependency group (``pip install 'segnode[...]'``) that is missing."""


@dataclass(frozen=True)
class Extra:
    """An optional dependency group of pyproject.toml, and the modules a command needs from it."""

    name: str
    modules: tuple[str, ...]


@dataclass(frozen=True)
class CommandSpec:
    """Where a command lives, its one-line help, and the extra it needs (None: the base install).

    ``target`` is ``"module:attr"``; ``attr`` is a :class:`typer.Typer` (a command group) or a
    function (one command).
    """

    target: str
    help: str
    extra: Extra | None = None


def importable(module: str) -> bool:
    """True when ``module`` can be found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a blocking import hook; None in sys.modules
        return False


def check_extra(command: str, extra: Extra | None) -> None:
    """Raise :class:`MissingExtraError` when a module of ``extra`` is not installed.

    Raises
    ------
    MissingExtraError
        One line: the command, the extra, the missing modules and the pip command that installs them.
    """
    if extra is None:
        return
    missing = [m for m in extra.modules if not importable(m)]
    if missing:
        raise MissingExtraError(
            f"segnode {command} needs the {extra.name} extra ({', '.join(missing)} not installed): "
            f"pip install 'segnode[{extra.name}]'"
        )


def load_command(name: str, spec: CommandSpec) -> _click.Command:
    """Check the extra, import ``spec.target`` and build it as the root would have registered it."""
    check_extra(name, spec.extra)
    module_name, _, attr = spec.target.partition(":")
    obj = getattr(importlib.import_module(module_name), attr)
    # A holder group, so that a Typer app is built as by add_typer (no completion options of its
    # own) and a function as by app.command; the command is then taken out of it.
    holder = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    holder.callback()(_no_op)
    if isinstance(obj, typer.Typer):
        holder.add_typer(obj, name=name)
    else:
        holder.command(name)(obj)
    group = typer.main.get_command(holder)
    assert isinstance(group, TyperGroup)
    return group.commands[name]


def _no_op() -> None:
    """The holder group's callback (never run)."""


class LazyCommand(TyperCommand):
    """A stand-in that shows the table's help and hands parsing to the real command, loaded then."""

    def __init__(self, name: str, spec: CommandSpec) -> None:
        super().__init__(name=name, help=spec.help, short_help=spec.help, add_help_option=False)
        self.spec = spec
        self._real: _click.Command | None = None

    def load(self) -> _click.Command:
        """The real command (imported on first use)."""
        if self._real is None:
            self._real = load_command(self.name or "", self.spec)
        return self._real

    def make_context(
        self, info_name: str | None, args: list[str], parent: _click.Context | None = None, **extra: Any
    ) -> _click.Context:
        # The group invokes ``sub_ctx.command``, so the real command runs from here on.
        return self.load().make_context(info_name, args, parent=parent, **extra)


class LazyGroup(TyperGroup):
    """A group with one :class:`LazyCommand` per row of ``table`` (a subclass sets the table)."""

    table: ClassVar[dict[str, CommandSpec]] = {}

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for name, spec in self.table.items():
            self.commands.setdefault(name, LazyCommand(name, spec))
