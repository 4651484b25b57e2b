"""The command line's naming scheme as a test over the Typer command table.

Rules (docs/cli.md): the model is always ``--model``, the data always the positional argument;
``--out`` says in its metavar and help whether it is a folder or a file; ``--workers`` means
inference workers only (DataLoader processes are ``--loader-workers``); lists are given by
repeating the option; ``--json`` is a flag; ``--split`` picks a split and ``--splits-csv``
names a splits.csv; times carry their unit in the name; every option has help, and no help
shows ``<bool>`` or a ``{name}`` placeholder. Each rule is also shown failing on a planted
violation, and every old spelling still parses to today's, with its deprecation line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.core import TyperArgument, TyperOption
from typer.testing import CliRunner

from kidney_edge.cli import COMMAND_MODULES, app
from kidney_edge.cli._app import PANEL_DATA, App, Command, NowArgument, NowOption, Renamed

runner = CliRunner()
# Words that name a model: a parameter so named must be the option --model.
MODEL_WORDS = {"model", "source", "run", "onnx"}
# Option names that carry a time and so need a unit suffix.
TIME_WORDS = ("time", "wait", "budget", "timeout")
TIME_UNITS = ("-min", "-ms", "-s")
PLACEHOLDER = re.compile(r"<bool>|\{[A-Za-z_]+\}")


def _group(typer_app: typer.Typer):  # noqa: ANN202 - typer's vendored click group
    return typer.main.get_command(typer_app)


def _help(typer_app: typer.Typer, command: str) -> str:
    result = runner.invoke(typer_app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def naming_problems(typer_app: typer.Typer) -> list[str]:
    """Every way the commands of ``typer_app`` break the naming scheme, one line each."""
    problems = []
    for name, command in _group(typer_app).commands.items():
        where = f"{name}:"
        if not isinstance(command, Command):
            problems.append(f"{where} not a kidney-edge Command (no clean metavars, no old spellings)")
        if not command.rich_help_panel:
            problems.append(f"{where} in no help panel")
        for placeholder in sorted(set(PLACEHOLDER.findall(_help(typer_app, name)))):
            problems.append(f"{where} help shows {placeholder}")
        for param in command.params:
            opts = getattr(param, "opts", [])
            label = f"{where} {'/'.join(opts) if isinstance(param, TyperOption) else param.name}"
            help_text = param.help or ""
            if not help_text.strip():
                problems.append(f"{label} has no help")
            if param.name in MODEL_WORDS and (not isinstance(param, TyperOption) or opts != ["--model"]):
                problems.append(f"{label} names a model: make it the option --model")
            if not isinstance(param, TyperOption):
                continue
            if "--workers" in opts and "dataloader" in help_text.lower():
                problems.append(f"{label} means DataLoader processes: name it --loader-workers")
            if "--loader-workers" in opts and "dataloader" not in help_text.lower():
                problems.append(f"{label} must say it counts DataLoader processes")
            if "comma" in help_text.lower():
                problems.append(f"{label} takes a comma list: make it repeatable")
            if ("repeat" in help_text.lower()) != bool(param.multiple):
                problems.append(f"{label} is repeatable iff its help says 'repeat'")
            if "--out" in opts and not (
                (param.metavar == "DIR" and help_text.startswith("Folder"))
                or (param.metavar == "FILE" and help_text.startswith("File"))
            ):
                problems.append(f"{label} must be metavar DIR + help 'Folder...' or FILE + 'File...'")
            if "--json" in opts and not param.is_flag:
                problems.append(f"{label} must be a flag (print JSON); write files with --out")
            if {"--images", "--splits"} & set(opts):
                problems.append(f"{label} is retired: data is positional, a splits.csv is --splits-csv")
            if "--split" in opts and param.type_descriptor.choices is None:
                problems.append(f"{label} picks one split by name: make it a choice")
            for opt in opts:
                if any(word in opt for word in TIME_WORDS) and not opt.endswith(TIME_UNITS):
                    problems.append(f"{where} {opt} carries a time: end its name in {'/'.join(TIME_UNITS)}")
    return problems


def test_the_command_table_follows_the_naming_scheme() -> None:
    assert naming_problems(app) == []


def test_the_naming_check_sees_each_planted_violation(tmp_path: Path) -> None:
    bad = typer.Typer()
    bad.callback()(lambda: None)  # a group, as kidney-edge's, even with one command

    @bad.command()
    def predict(
        source: Path,
        workers: Annotated[int, typer.Option("--workers", help="DataLoader worker processes.")] = 0,
        batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated sizes.")] = "1,8",
        out: Annotated[Path, typer.Option("--out", help="Where results go.")] = Path("x"),
        as_json: Annotated[Path | None, typer.Option("--json", help="JSON record path.")] = None,
        images: Annotated[Path | None, typer.Option("--images", help="Folder.")] = None,
        time_budget: Annotated[float, typer.Option("--time-budget", help="Budget.")] = 1.0,
        quiet: bool = False,
    ) -> None:
        """A command that breaks every rule."""

    problems = "\n".join(naming_problems(bad))
    for expected in (
        "not a kidney-edge Command", "in no help panel", "help shows <bool>", "help shows {source}",
        "--quiet has no help", "source names a model", "name it --loader-workers", "make it repeatable",
        "--out must be metavar DIR", "--json must be a flag", "--images is retired",
        "--time-budget carries a time",
    ):  # fmt: skip
        assert expected in problems, f"{expected!r} not found in:\n{problems}"
    good = App()
    good.callback()(lambda: None)

    @good.command(rich_help_panel=PANEL_DATA)
    def split(data: Annotated[Path, typer.Argument(help="Data.")]) -> None:
        """A command that keeps every rule."""

    assert naming_problems(good) == []


def test_commands_are_listed_in_pipeline_order() -> None:
    output = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    positions = [re.search(rf"^│ {name} ", output, re.MULTILINE).start() for name in COMMAND_MODULES]
    assert positions == sorted(positions), output
    assert list(COMMAND_MODULES)[:5] == ["synth", "split", "train", "evaluate", "export"]


# Every old spelling: the arguments of the previous release -> today's. Parsing both must give
# the same parameters; the old ones print one deprecation line per old spelling.
OLD_TO_NEW = {
    "train": [
        (["data", "--workers", "3"], ["data", "--loader-workers", "3"]),
        (["data", "--time-budget", "5"], ["data", "--time-budget-min", "5"]),
        (["data", "--time-budget=5"], ["data", "--time-budget-min", "5"]),
        (["data", "--splits", "s.csv"], ["data", "--splits-csv", "s.csv"]),
    ],
    "evaluate": [
        (["best.pt", "data", "--split", "val"], ["data", "--model", "best.pt", "--split", "val"]),
    ],
    "export": [
        (["run"], ["--model", "run"]),
        (["run", "--images", "a", "--images", "b"], ["--model", "run", "a", "b"]),
        (["--model", "run", "--splits", "s.csv"], ["--model", "run", "--splits-csv", "s.csv"]),
    ],
    "benchmark": [
        (["--batch-sizes", "1,8"], ["--batch-size", "1", "--batch-size", "8"]),
        (["--threads", "1,2"], ["--threads", "1", "--threads", "2"]),
        (["--images", "folder"], ["folder"]),
        (["--json", "b.json"], ["--out", "b.json"]),
    ],
    "split": [
        (["data", "--ratios", "0.8,0.1,0.1"], ["data", "--ratios", "0.8", "0.1", "0.1"]),
    ],
}


def _old_cases() -> list[tuple[str, list[str], list[str]]]:
    return [(command, old, new) for command, pairs in OLD_TO_NEW.items() for old, new in pairs]


@pytest.mark.parametrize(("command", "old", "new"), _old_cases())
def test_old_spellings_still_parse_with_one_deprecation_line(
    command: str, old: list[str], new: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    click_command = _group(app).commands[command]
    today = click_command.make_context(command, list(new)).params
    assert capsys.readouterr().err == ""
    assert click_command.make_context(command, list(old)).params == today
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and all(line.startswith(f"deprecated: kidney-edge {command}:") for line in lines)
    assert len(lines) == len(set(lines)), lines  # one line per old spelling, however often used


def test_every_declared_old_spelling_is_tested() -> None:
    tested = {(command, token.partition("=")[0]) for command, old, _ in _old_cases() for token in old}
    for name, command in _group(app).commands.items():
        for spelling in command.old_spellings:
            if isinstance(spelling, (Renamed, NowArgument)):
                assert (name, spelling.old) in tested, f"{name} {spelling.old} has no case in OLD_TO_NEW"
            else:
                assert isinstance(spelling, NowOption) and name in OLD_TO_NEW


def test_old_and_new_spellings_are_distinct_and_old_ones_hidden() -> None:
    for name, command in _group(app).commands.items():
        options = {opt for param in command.params if isinstance(param, TyperOption) for opt in param.opts}
        positionals = {param.name for param in command.params if isinstance(param, TyperArgument)}
        for spelling in command.old_spellings:
            if isinstance(spelling, Renamed):
                assert spelling.old not in options and spelling.new in options, (name, spelling)
            elif isinstance(spelling, NowArgument):
                assert spelling.old not in options and spelling.new.lower() in positionals, (name, spelling)
            else:
                assert spelling.new in options, (name, spelling)
