"""`kidney-edge synth` and `kidney-edge split`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table

from kidney_edge.cli._app import PANEL_DATA, app, console, err_console, library_errors
from kidney_edge.dataset import SplitConfig
from kidney_edge.layout import SPLITS_FILE
from kidney_edge.phantoms.dicom_series import DEFAULT_DIFFICULTY as SERIES_DIFFICULTY
from kidney_edge.phantoms.dicom_series import SLICES_PER_SERIES, SeriesPhantomConfig
from kidney_edge.phantoms.kaggle_layout import DEFAULT_DIFFICULTY, KAGGLE_CLASS_COUNTS
from kidney_edge.phantoms.lookalike import SIZE_FACTORS
from kidney_edge.phantoms.styles import STYLE_SLICES_PER_PATIENT, PhantomFormat, PhantomStyle


class SplitMode(str, Enum):
    grouped = "grouped"
    random = "random"


@app.command(rich_help_panel=PANEL_DATA)
def synth(
    out: Annotated[
        Path,
        typer.Argument(
            metavar="DATA", help="Folder to write the phantom dataset into (the DATA of split and train)."
        ),
    ],
    n: Annotated[
        int | None,
        typer.Option(
            "--n",
            help=f"Number of images (default: the Kaggle dataset's {sum(KAGGLE_CLASS_COUNTS.values()):,}); "
            f"--format dicom: number of series (default {SeriesPhantomConfig.n_series}).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same files.")] = 0,
    size: Annotated[
        int,
        typer.Option(
            "--size",
            help=f"Image side in pixels (lookalike: each patient's is {min(SIZE_FACTORS)}-{max(SIZE_FACTORS)} x this).",
        ),
    ] = 512,
    difficulty: Annotated[
        float | None,
        typer.Option(
            "--difficulty",
            help="0.25-4. Higher: smaller, fainter findings, more noise and look-alikes; the demo uses 0.25. "
            f"Default {DEFAULT_DIFFICULTY:g}; --format dicom: {SERIES_DIFFICULTY:g}, the demo's.",
        ),
    ] = None,
    slices_per_patient: Annotated[
        tuple[int, int] | None,
        typer.Option(
            "--slices-per-patient",
            metavar="MIN MAX",
            help="MIN MAX adjacent slices drawn of each patient (near-identical images that a split "
            "must keep together). Default: the style's ("
            + ", ".join(
                f"{style.value} {low} {high}" for style, (low, high) in STYLE_SLICES_PER_PATIENT.items()
            )
            + f"); --format dicom: slices per series (default {SLICES_PER_SERIES[0]} {SLICES_PER_SERIES[1]}).",
        ),
    ] = None,
    style: Annotated[
        PhantomStyle,
        typer.Option(
            "--style",
            help="classic: the tuned phantom of the demo and tests. lookalike: an independent renderer "
            "(other anatomy, noise, image sizes, fields of view and JPEG quality) to check training "
            "defaults on data they were not tuned on. lookalike-one-scanner: the same patients imaged alike "
            "(one matrix size, kernel, noise, window, JPEG quality), to tell scanner effects from findings.",
        ),
    ] = PhantomStyle.classic,
    fmt: Annotated[
        PhantomFormat,
        typer.Option(
            "--format",
            help="kaggle: class folders of JPEG slices. dicom: one CT study per patient, a series of "
            "DICOM slices in a PACS-style folder tree, with series_truth.csv and splits.csv (classic style).",
        ),
    ] = PhantomFormat.KAGGLE,
) -> None:
    """Generate a phantom kidney CT dataset: JPEG slices in the Kaggle layout, or DICOM series."""
    from kidney_edge.phantoms.styles import synthesizer

    if fmt is PhantomFormat.DICOM:
        _synth_series(out, n, seed, size, difficulty, slices_per_patient, style)
        return
    n = sum(KAGGLE_CLASS_COUNTS.values()) if n is None else n
    difficulty = DEFAULT_DIFFICULTY if difficulty is None else difficulty
    options = {} if slices_per_patient is None else {"slices_per_patient": slices_per_patient}
    with library_errors(), Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("drawing slices", total=n)
        summary = synthesizer(style)(
            out,
            n=n,
            seed=seed,
            size=size,
            difficulty=difficulty,
            progress=lambda done, total: bar.update(task, completed=done),
            **options,
        )
    counts = ", ".join(f"{name} {count}" for name, count in summary.class_counts.items())
    console.print(
        f"wrote {summary.n_images} images ({counts}) of {summary.n_patients} patients, "
        f"{summary.n_duplicates} byte-identical copies, to {summary.out_dir}"
    )


def _synth_series(
    out: Path,
    n: int | None,
    seed: int,
    size: int,
    difficulty: float | None,
    slices_per_series: tuple[int, int] | None,
    style: PhantomStyle,
) -> None:
    from kidney_edge.errors import InputError
    from kidney_edge.phantoms.dicom_series import synthesize_series

    with library_errors():
        if style is not PhantomStyle.classic:
            raise InputError("--format dicom draws the classic phantom (the demo model's); drop --style")
        config = SeriesPhantomConfig(
            n_series=SeriesPhantomConfig.n_series if n is None else n,
            seed=seed,
            size=size,
            difficulty=SERIES_DIFFICULTY if difficulty is None else difficulty,
            slices_per_series=slices_per_series or SLICES_PER_SERIES,
        )
        with Progress(console=err_console, transient=True) as bar:
            task = bar.add_task("drawing series", total=config.n_series)
            summary = synthesize_series(
                out, config, progress=lambda done, total: bar.update(task, completed=done)
            )
    counts = ", ".join(f"{name} {count}" for name, count in summary.class_counts.items())
    quirks = ", ".join(summary.quirks) or "none"
    console.print(
        f"wrote {summary.n_series} DICOM series ({counts}), {summary.n_files} files, to {summary.out_dir}; "
        f"series with export quirks: {quirks}; truth in {summary.truth_csv.name}, slice labels in "
        f"{summary.splits_csv.name}"
    )


@app.command(rich_help_panel=PANEL_DATA)
def split(
    data: Annotated[Path, typer.Argument(help="Dataset folder: one sub-folder per class (Kaggle layout).")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            metavar="FILE",
            help="File to write the splits.csv manifest to; the audit JSON goes beside it.",
        ),
    ] = Path(SPLITS_FILE),
    seed: Annotated[
        int, typer.Option("--seed", help="Random seed of the group assignment.")
    ] = SplitConfig.seed,
    ratios: Annotated[
        tuple[float, float, float],
        typer.Option("--ratios", metavar="TRAIN VAL TEST", help="Shares of the three splits, summing to 1."),
    ] = SplitConfig.ratios,  # type: ignore[assignment]
    split_mode: Annotated[
        SplitMode,
        typer.Option("--split-mode", help="grouped, or random (leaks; exists only to show the leak)."),
    ] = SplitMode.grouped,
    group_pattern: Annotated[
        str | None,
        typer.Option(
            "--group-pattern",
            help="Regex searched in each path relative to DATA; its first capture group (or the whole "
            "match) is a patient key whose files stay in one split. E.g. '^(.*\\(\\d*)\\d\\)' keeps "
            "blocks of ten consecutive numbers together.",
        ),
    ] = None,
    near_dup_distance: Annotated[
        int,
        typer.Option(
            "--near-dup-distance", help="Perceptual-hash distance (of 256 bits) for near duplicates; -1: off."
        ),
    ] = SplitConfig.near_dup_distance,
    series_distance: Annotated[
        float,
        typer.Option(
            "--series-distance", help="Thumbnail difference linking consecutively numbered files; -1: off."
        ),
    ] = SplitConfig.series_distance,
    max_group_share: Annotated[
        float,
        typer.Option(
            "--max-group-share",
            help="Most of all images one near-duplicate/series group may hold: larger chains of "
            "look-alikes are cut at their weakest links (byte-identical copies and --group-pattern "
            "keys stay whole); -1: never cut.",
        ),
    ] = SplitConfig.max_group_share,
    proportion_tolerance: Annotated[
        float,
        typer.Option(
            "--proportion-tolerance",
            help="How far (as a share of the class) a class's split shares may stray from --ratios "
            "before its groups are cut finer at weak links.",
        ),
    ] = SplitConfig.proportion_tolerance,
    min_eval_images: Annotated[
        int,
        typer.Option(
            "--min-eval-images",
            help="Images of every class that val and test should each hold; fewer are warned about.",
        ),
    ] = SplitConfig.min_eval_images,
) -> None:
    """Scan a dataset folder and write a leakage-safe 70/15/15 splits.csv with an audit."""
    from kidney_edge.dataset import audit_path, split_dataset

    with library_errors():
        with Progress(console=err_console, transient=True) as bar:
            task = bar.add_task("scanning images", total=None)
            config = SplitConfig(
                ratios=tuple(ratios),
                seed=seed,
                mode=split_mode.value,
                group_pattern=group_pattern,
                near_dup_distance=None if near_dup_distance < 0 else near_dup_distance,
                series_distance=None if series_distance < 0 else series_distance,
                max_group_share=None if max_group_share < 0 else max_group_share,
                proportion_tolerance=proportion_tolerance,
                min_eval_images=min_eval_images,
            )
            result = split_dataset(
                data, out, config, progress=lambda done, total: bar.update(task, completed=done, total=total)
            )
    _print_audit(result.audit)
    console.print(f"wrote {out} and {audit_path(out)}")


def _print_audit(audit: dict[str, Any]) -> None:
    table = Table(title=f"split ({audit['mode']} mode, seed {audit['seed']})")
    table.add_column("class")
    for split_name in ("train", "val", "test"):
        table.add_column(split_name, justify="right")
    for name in audit["class_names"]:
        cells = [
            f"{audit['counts'][s][name]} ({audit['proportions'][name][s]:.1%})"
            for s in ("train", "val", "test")
        ]
        table.add_row(name, *cells)
    console.print(table)
    leak = Table(title="leakage audit")
    leak.add_column("check")
    leak.add_column("value", justify="right")
    groups = audit["groups"]
    leak.add_row(
        "exact-duplicate groups (files)",
        f"{audit['exact_duplicates']['groups']} ({audit['exact_duplicates']['files']})",
    )
    leak.add_row(
        "near-duplicate groups (files)",
        f"{audit['near_duplicates']['groups']} ({audit['near_duplicates']['files']})",
    )
    leak.add_row(
        "groups / largest (share) / crossing splits",
        f"{groups['total']} / {groups['largest']} ({groups['largest_share']:.1%}) / {groups['crossing_splits']}",
    )
    cuts = audit["group_cuts"]
    leak.add_row(
        "group bound (images) / links cut / groups cut",
        f"{cuts['bound_images']} / {cuts['links_cut']} / {cuts['groups_cut']}",
    )
    for split_name, numbers in audit["leak"].items():
        leak.add_row(f"{split_name} images with an exact twin in train", str(numbers["exact_twin_in_train"]))
        leak.add_row(f"{split_name} images with a near twin in train", str(numbers["near_twin_in_train"]))
    leak.add_row("label conflicts (files excluded)", str(audit["label_conflicts"]["files"]))
    leak.add_row("scan problems", str(len(audit["scan_problems"])))
    console.print(leak)
    for warning in audit["warnings"]:
        err_console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
    for problem in audit["scan_problems"][:10]:
        err_console.print(f"[yellow]skipped[/] {problem['path']}: {problem['reason']}", highlight=False)
    if len(audit["scan_problems"]) > 10:
        err_console.print(f"... and {len(audit['scan_problems']) - 10} more problems (see the audit JSON)")
