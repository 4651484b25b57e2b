"""The Typer app, its command class, and the one place that turns library errors into exit codes.

Command modules register on :data:`app`; each command parses options, calls one library
function inside :func:`library_errors`, and renders the result. Library imports happen
inside the command functions so that ``kidney-edge --help`` and the runtime commands never
import torch.

Every command is a :class:`Command`: its usage line and help show plain metavars (``DATA``,
no ``{data}`` and no ``<bool>`` beside flags), and it accepts the spellings of the previous
release listed in its ``old_spellings``, rewriting them to today's and printing one
deprecation line per old spelling to stderr (:func:`rewrite_old_spellings`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import typer
from rich.console import Console
from rich.progress import Progress
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

Parameter = TyperArgument | TyperOption

# Help panels of `kidney-edge --help`, in pipeline order: data -> model -> edge -> tools.
PANEL_DATA = "Data"
PANEL_MODEL = "Model (needs the train extra: torch)"
PANEL_EDGE = "Edge runtime (onnxruntime only, no torch)"
PANEL_TOOLS = "Tools"

# Old spellings are accepted for one release: this is the release that drops them.
OLD_SPELLINGS_REMOVED_IN = "0.2"

console = Console()
err_console = Console(stderr=True)


# --------------------------------------------------------------------------- old spellings


@dataclass(frozen=True)
class Renamed:
    """Option ``old`` is now ``new`` (same value)."""

    old: str
    new: str


@dataclass(frozen=True)
class NowArgument:
    """Option ``old`` is now the positional argument ``new``: its values move to the end."""

    old: str
    new: str


@dataclass(frozen=True)
class NowOption:
    """The first positional argument is now option ``new``, when ``new`` is absent and at
    least ``positionals`` positional arguments were given (the old arity)."""

    old: str  # the old positional's name, e.g. MODEL
    new: str
    positionals: int


OldSpelling = Renamed | NowArgument | NowOption


def warn_old_spelling(command: str, old: str, new: str) -> None:
    """The one deprecation line: what was written, what to write instead."""
    from rich.markup import escape

    err_console.print(
        f"[yellow]deprecated:[/] kidney-edge {command}: {escape(old)} is now {escape(new)}; the old spelling "
        f"will be removed in {OLD_SPELLINGS_REMOVED_IN}",
        highlight=False,
        soft_wrap=True,
    )


def _value_arity(param: Parameter | None) -> int:
    """How many tokens follow the option on the command line (0 for flags and unknown options)."""
    if not isinstance(param, TyperOption) or param.is_flag or param.count:
        return 0
    return max(param.nargs, 1)


def _is_list(param: Parameter | None) -> bool:
    return isinstance(param, TyperOption) and (param.multiple or param.nargs > 1)


def rewrite_old_spellings(
    command: TyperCommand, args: Sequence[str], warn: Callable[[str, str], None]
) -> list[str]:
    """``args`` with every old spelling of ``command`` replaced by today's.

    Besides the command's ``old_spellings``, a comma list given to a list option (repeatable,
    or a fixed number of values) is split: ``--threads 1,2`` -> ``--threads 1 --threads 2``,
    ``--ratios 0.7,0.15,0.15`` -> ``--ratios 0.7 0.15 0.15``. ``warn(old, new)`` is called once
    per old spelling. Arguments without an old spelling come back unchanged.
    """
    spellings: Sequence[OldSpelling] = getattr(command, "old_spellings", ())
    renamed = {s.old: s.new for s in spellings if isinstance(s, Renamed)}
    to_argument = {s.old: s.new for s in spellings if isinstance(s, NowArgument)}
    options = {
        opt: param for param in command.params if isinstance(param, TyperOption)
        for opt in (*param.opts, *param.secondary_opts)
    }  # fmt: skip
    items: list[tuple[str, list[str]]] = []  # ("option" | "positional", tokens)
    moved: list[str] = []
    warned: dict[str, str] = {}
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            items.extend(("positional", [rest]) for rest in args[i:])
            break
        if not token.startswith("-") or token == "-":
            items.append(("positional", [token]))
            continue
        name, eq, inline = token.partition("=")
        if name in to_argument:
            value = inline if eq else (args[i] if i < len(args) else "")
            i += 0 if eq else 1
            warned.setdefault(name, f"the positional {to_argument[name]}")
            moved.append(value)
            continue
        old_name = name if name in renamed else None
        name = renamed.get(name, name)
        param = options.get(name)
        arity = _value_arity(param)
        first = inline if eq else (args[i] if arity and i < len(args) else None)
        if _is_list(param) and first is not None and "," in first:
            i += 0 if eq else 1
            values = [part.strip() for part in first.split(",") if part.strip()]
            if param.multiple:  # type: ignore[union-attr]
                spelled = [piece for value in values for piece in (name, value)]
            else:
                spelled = [name, *values]
            warned.setdefault(f"{old_name or name} {first}", " ".join(spelled))
            items.append(("option", spelled))
            continue
        if old_name:
            warned.setdefault(old_name, name)
        if eq:
            items.append(("option", [f"{name}={inline}"]))
        else:
            items.append(("option", [name, *args[i : i + arity]]))
            i += arity
    for spelling in spellings:
        if not isinstance(spelling, NowOption):
            continue
        given = any(
            kind == "option" and tokens[0].partition("=")[0] == spelling.new for kind, tokens in items
        )
        positions = [n for n, (kind, _) in enumerate(items) if kind == "positional"]
        if not given and len(positions) >= spelling.positionals:
            (value,) = items[positions[0]][1]
            items[positions[0]] = ("option", [spelling.new, value])
            warned.setdefault(f"the positional {spelling.old}", f"{spelling.new} {spelling.old}")
    if not warned:
        return list(args)
    for old, new in warned.items():
        warn(old, new)
    return [token for _, tokens in items for token in tokens] + moved


# --------------------------------------------------------------------------- help rendering


def _clean_metavars(params: Sequence[Parameter]) -> None:
    """Flags show no type (Typer would print ``<bool>``); arguments show their NAME."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
        elif isinstance(param, TyperArgument) and param.metavar is None:
            param.metavar = (param.name or "").upper()


def usage_pieces(command: TyperCommand, ctx: typer.Context) -> list[str]:
    """The usage line's pieces: ``[OPTIONS] DATA [MORE]...``, not Typer's ``{data}``."""
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.get_params(ctx):
        if not isinstance(param, TyperArgument):
            continue
        name = param.metavar or (param.name or "").upper()
        name = name if param.required else f"[{name}]"
        pieces.append(name + ("..." if param.nargs != 1 else ""))
    return pieces


class Command(TyperCommand):
    """A kidney-edge command: clean metavars, and today's spelling of every old one."""

    old_spellings: tuple[OldSpelling, ...] = ()

    def get_params(self, ctx: typer.Context) -> list[Parameter]:
        params = super().get_params(ctx)
        _clean_metavars(params)
        return params

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        return usage_pieces(self, ctx)

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        name = self.name or ""
        args = rewrite_old_spellings(self, args, lambda old, new: warn_old_spelling(name, old, new))
        return super().parse_args(ctx, args)


class Group(TyperGroup):
    """The top-level group: commands listed in pipeline order, clean metavars."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        from kidney_edge.cli import COMMAND_MODULES

        order = list(COMMAND_MODULES)
        return sorted(self.commands, key=lambda name: order.index(name) if name in order else len(order))

    def get_params(self, ctx: typer.Context) -> list[Parameter]:
        params = super().get_params(ctx)
        _clean_metavars(params)
        return params


class App(typer.Typer):
    """``typer.Typer`` whose commands are :class:`Command`; ``old_spellings`` lists the
    previous release's spellings that a command still accepts."""

    def command(  # type: ignore[override]
        self, *args: Any, old_spellings: Sequence[OldSpelling] = (), **kwargs: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        cls = type("Command", (Command,), {"old_spellings": tuple(old_spellings), "__module__": __name__})
        return super().command(*args, cls=cls, **kwargs)


app = App(
    name="kidney-edge",
    cls=Group,
    help="Kidney CT slice classifier (Normal, Cyst, Stone, Tumor): train, evaluate, export to "
    "ONNX/INT8 and run on CPU-only edge machines. Commands are listed in pipeline order; "
    "`kidney-edge COMMAND --help` for each.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@contextlib.contextmanager
def library_errors() -> Iterator[None]:
    """Run library code; a KidneyEdgeError becomes one line on stderr and its exit code."""
    from kidney_edge.errors import KidneyEdgeError

    try:
        yield
    except KidneyEdgeError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130) from None


def progress_bar(*extra_columns: object) -> Progress:
    """The CLI's progress bar: description, bar, n/total, elapsed, then ``extra_columns``."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        *extra_columns,
        console=console,
        transient=True,
    )


def print_headline(metrics: dict[str, Any], title: str) -> None:
    """The headline figures (positive class first) with CIs, saying which labels they are of,
    then argmax vs the decision rule when the rule is not argmax."""
    from rich.table import Table

    from kidney_edge.report import (
        RULE_COMPARISON_HEADER,
        headline_caption,
        headline_header,
        headline_rows,
        rule_comparison_rows,
    )

    table = Table(title=f"{title}, {headline_caption(metrics)}")
    for column in headline_header(metrics):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for row in headline_rows(metrics):
        table.add_row(*row)
    console.print(table)
    comparison = rule_comparison_rows(metrics)
    if comparison:
        rule_table = Table(title="argmax vs the decision rule")
        for column in RULE_COMPARISON_HEADER:
            rule_table.add_column(column, justify="left" if column == "figure" else "right")
        for row in (
            comparison[:3] + comparison[-2:]
        ):  # positive recall/precision/specificity, macro-F1, accuracy
            rule_table.add_row(*row)
        console.print(rule_table)


def human_bytes(size: int) -> str:
    """1024-based size with its unit, e.g. ``32 MiB``, ``4.1 MiB``, ``812 B``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" or value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _print_version(value: bool) -> None:
    if value:
        from kidney_edge import __version__

        console.print(f"kidney-edge {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the library's log messages."),
    version: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        callback=_print_version,
        help="Print the toolkit's version and exit.",
    ),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
