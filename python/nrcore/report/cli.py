"""`nrcore report` and `nrcore table` (loaded lazily by nrcore.cli, so matplotlib is imported
only when a report is drawn)."""

from __future__ import annotations

import click


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the PNG figures and index.md.")
@click.option("--every-seed", is_flag=True, default=False, help="Per-run figures for every seed (default: the lowest seed of each method).")
def report(run_dirs, out, every_seed):
    """Figures of finished runs and an index.md that shows them.

    RUN_DIRS are run directories or folders holding them (searched recursively); unfinished runs
    are skipped with a note. Draws accuracy per epoch for every run, weight trajectories,
    histograms, AUROC and the mean weight per (true class, training label) pair for
    per-example-weight methods, and label-correction heatmaps for mlc, mlc-d and ebomlc.
    """
    from nrcore.report.figures import render_report

    try:
        result = render_report(run_dirs, out, every_seed=every_seed)
    except ValueError as exc:
        raise _fail(exc) from None
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {len(result.figures)} figures and {result.index}")


@click.command("table")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["md", "csv"]), default="md", show_default=True, help="Markdown table (with a legend) or CSV of plain numbers.")
def table(run_dirs, fmt):
    """One row per (dataset, noise, model, method): test accuracy at the last epoch and at the
    best clean-validation epoch as mean ± sample std (ddof=1) over seeds, the number of seeds,
    weight AUROC when present, and time per step relative to `ce`.

    RUN_DIRS are run directories or folders holding them (searched recursively); unfinished runs
    are skipped with a note.
    """
    from nrcore.report.table import make_table

    try:
        text, notes = make_table(run_dirs, fmt)
    except ValueError as exc:
        raise _fail(exc) from None
    click.echo(text, nl=False)
    if fmt == "csv":
        for note in notes:
            click.echo(f"note: {note}", err=True)
