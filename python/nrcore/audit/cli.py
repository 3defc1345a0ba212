"""`nrcore audit RUN_DIR` (loaded lazily by nrcore.cli)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import click


@click.command("audit")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the ranked examples to this CSV (columns index, given_label, suggested_label, score, source, source_index); "
              "default: print the top --top rows.")
@click.option("--top", type=click.IntRange(min=1), default=None, help="Only the K most suspect examples (default: all with --out, 20 printed).")
@click.option("--signal", default=None, help="Which per-example signal ranks the examples (default: the method's; see --list-signals).")
@click.option("--list-signals", is_flag=True, help="List the run's signals and exit.")
@click.option("--export-labels", type=click.Path(dir_okay=False), default=None,
              help="Write the training labels (.npy, the order of labels/train_labels.npy) with the suggested label for the flagged examples.")
def audit(run_dir, out, top, signal, list_signals, export_labels):
    """Rank a finished run's training examples by how likely their label is wrong.

    Reads only RUN_DIR: the per-example signals the run saved (audit.npz: training dynamics,
    per-example weights, the final model's posterior, the method's own) and its labels/. Prints
    which signal ranks, and, when the run knows the true labels (synthetic noise, CIFAR-N), the
    AUROC, average precision, and precision/recall of the flagged examples.

    The number flagged is the training labels' noise rate estimated from the final model's
    disagreement with them, corrected for its error on the clean validation split (never the
    true labels); --export-labels changes the flagged examples' labels to the suggestion and
    never a trusted example's.
    """
    from nrcore.audit.core import CSV_COLUMNS, AuditError, load_audit

    try:
        result = load_audit(run_dir)
        if list_signals:
            for name, sig in sorted(result.signals.items()):
                mark = " (default)" if name == result.default else ""
                click.echo(f"{name}{mark}: {sig.description}")
            for name, why in sorted(result.absent.items()):
                click.echo(f"{name}: absent: {why}")
            return
        chosen = result.signal(signal)
        rows = result.rows(chosen.name, top=top if (top or out) else 20)
        flagged = None
        try:
            flagged = result.flag_count()
        except AuditError as exc:
            if export_labels:
                raise
            click.echo(f"note: {exc}; no flag count", err=True)
        exported = result.exported_labels(chosen.name) if export_labels else None
    except AuditError as exc:
        raise click.ClickException(str(exc)) from None

    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"{result.run_dir}: {result.method}, {len(result.given)} training examples, ranked by {chosen.name}: {chosen.description}")
    if flagged is not None:
        click.echo(f"flagged: {flagged} ({100 * result.estimated_noise_rate():.1f}% estimated noise rate; from the final model and the validation split)")
    if result.knows_truth:
        d = result.detection(chosen.name, flagged=flagged if flagged is not None else 0)
        line = (f"against the true labels ({d['mislabelled']} mislabelled, {100 * d['mislabelled'] / d['examples']:.1f}%): "
                f"AUROC {d['auroc']:.3f}, average precision {d['average_precision']:.3f}")  # fmt: skip
        if flagged:
            line += f", precision {_pct(d['precision_at_flagged'])} / recall {_pct(d['recall_at_flagged'])} of the {flagged} flagged"
        click.echo(line + f"; at the {d['mislabelled']} top-ranked: precision {_pct(d['precision_at_mislabelled'])}")
    if out:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        Path(out).write_text(buf.getvalue())
        click.echo(f"wrote {len(rows)} rows to {out}")
    else:
        click.echo(",".join(CSV_COLUMNS))
        for row in rows:
            click.echo(",".join(str(row[c]) if c != "score" else f"{row[c]:.6g}" for c in CSV_COLUMNS))
    if exported is not None:
        import numpy as np

        labels, changed, flagged_count = exported
        with open(export_labels, "wb") as f:
            np.save(f, labels)
        click.echo(f"wrote {export_labels}: {changed} of {len(labels)} labels changed ({flagged_count} flagged; trusted examples never change)")


def _pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}%"
