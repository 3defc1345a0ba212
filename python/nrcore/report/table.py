"""`nrcore table`: one row per (dataset, noise, model, method), mean ± std over seeds.

Columns: last-epoch test accuracy, test accuracy at the best clean-validation epoch, final weight
AUROC (per-example-weight methods), mean milliseconds per training step and that time as a
multiple of `ce`'s on the same dataset, noise, model, batch size, device and thread count. The
spread is the sample standard deviation (ddof=1); a single seed has none.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

from nrcore.report.runs import Run, RowKey, find_runs, group_runs, split_finished

BASELINE = "ce"

LEGEND = (
    "Mean ± sample standard deviation (ddof=1) over seeds; one seed has no spread. "
    "*test acc last*: the last epoch's test accuracy. *test acc @ best val*: test accuracy at the epoch "
    "with the best clean-validation accuracy (never selected on test data). *weight AUROC*: how well the "
    "final per-example weights separate clean from noisy training examples (uses the true labels; analysis "
    "only). *ms/step*: mean training time per step; *÷ ce*: that time divided by `ce`'s on the same dataset, "
    "noise, model, batch size, device and threads (blank when no such `ce` run was given). glc and forward "
    "(estimated matrix) train a plain model first: their best-val epoch is picked in the second phase, and "
    "their ms/step averages both phases of a run twice as long."
)


@dataclass
class Stat:
    """Mean and sample standard deviation of the non-missing values among `total` runs."""

    mean: Optional[float]
    std: Optional[float]
    n: int
    total: int

    @classmethod
    def of(cls, values: Sequence[Optional[float]]) -> "Stat":
        present = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        n = len(present)
        if n == 0:
            return cls(None, None, 0, len(values))
        mean = sum(present) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in present) / (n - 1)) if n > 1 else None
        return cls(mean, std, n, len(values))

    def text(self, digits: int) -> str:
        if self.mean is None:
            return "n/a"
        out = f"{self.mean:.{digits}f}"
        if self.std is not None:
            out += f" ± {self.std:.{digits}f}"
        if self.n < self.total:  # some seeds lack the number (e.g. no validation split)
            out += f" (n={self.n})"
        return out


@dataclass
class Row:
    key: RowKey
    runs: List[Run]
    test_last: Stat
    test_best_val: Stat
    weight_auroc: Stat
    seconds_per_step: Optional[float]
    time_vs_ce: Optional[float] = None

    @property
    def seeds(self) -> List[int]:
        return [r.seed for r in self.runs]

    def timing_context(self) -> tuple:
        """What must match for two rows' step times to be comparable (None: mixed in the row)."""
        def one(values):
            values = set(values)
            return values.pop() if len(values) == 1 else None

        return (
            one(r.config.get("batch_size") for r in self.runs),
            one((r.summary or {}).get("device") for r in self.runs),
            one((r.summary or {}).get("threads") for r in self.runs),
        )


def build_rows(runs: Iterable[Run]) -> List[Row]:
    """Rows from finished runs (call `split_finished` first), with time ratios to `ce`."""
    rows = []
    for key, members in group_runs(list(runs)).items():
        summaries = [r.summary or {} for r in members]
        rows.append(
            Row(
                key=key,
                runs=members,
                test_last=Stat.of([s.get("test_acc_last") for s in summaries]),
                test_best_val=Stat.of([r.test_acc_best_val for r in members]),
                weight_auroc=Stat.of([s.get("weight_auroc_last") for s in summaries]),
                seconds_per_step=Stat.of([s.get("seconds_per_step") for s in summaries]).mean,
            )
        )
    for row in rows:
        base = _baseline_for(row, rows)
        if base is not None and row.seconds_per_step is not None and base.seconds_per_step:
            row.time_vs_ce = row.seconds_per_step / base.seconds_per_step
    return rows


def _baseline_for(row: Row, rows: List[Row]) -> Optional[Row]:
    """The `ce` row timed under the same conditions, preferring identical settings."""
    context = row.timing_context()
    if None in context:
        return None
    candidates = [
        r for r in rows
        if r.key.method == BASELINE
        and (r.key.dataset, r.key.noise, r.key.model) == (row.key.dataset, row.key.noise, row.key.model)
        and r.timing_context() == context
    ]
    same_settings = [r for r in candidates if r.runs[0].settings == row.runs[0].settings]
    return (same_settings or candidates or [None])[0]


# ---- formatting ---------------------------------------------------------------------------
COLUMNS = ("dataset", "noise", "model", "method", "seeds", "test acc last (%)", "test acc @ best val (%)", "weight AUROC", "ms/step", "÷ ce")


def _cells(row: Row) -> List[str]:
    return [
        row.key.dataset,
        row.key.noise,
        row.key.model,
        row.key.label,
        str(len(row.runs)),
        row.test_last.text(2),
        row.test_best_val.text(2),
        row.weight_auroc.text(3) if row.weight_auroc.n else "",
        f"{1000 * row.seconds_per_step:.1f}" if row.seconds_per_step is not None else "n/a",
        f"{row.time_vs_ce:.2f}×" if row.time_vs_ce is not None else "",
    ]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> List[str]:
    """Aligned Markdown lines; the first `text_columns` columns left-aligned, the rest (numbers)
    right-aligned."""
    cells = [list(header)] + [list(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]

    def line(values):
        padded = [v.ljust(w) if i < text_columns else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i < text_columns else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return [line(cells[0]), rule] + [line(c) for c in cells[1:]]


def format_markdown(rows: List[Row], notes: Sequence[str] = (), legend: bool = True) -> str:
    out = markdown_table(COLUMNS, [_cells(r) for r in rows], text_columns=4)
    if legend:
        out += ["", LEGEND]
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


CSV_COLUMNS = (
    "dataset", "noise", "model", "method", "seeds",
    "test_acc_last_mean", "test_acc_last_std", "test_acc_best_val_mean", "test_acc_best_val_std",
    "weight_auroc_mean", "weight_auroc_std", "seconds_per_step", "time_vs_ce", "seed_list",
)


def format_csv(rows: List[Row]) -> str:
    """Plain numbers (std: sample, ddof=1; empty when undefined)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([
            r.key.dataset, r.key.noise, r.key.model, r.key.label, len(r.runs),
            _num(r.test_last.mean), _num(r.test_last.std), _num(r.test_best_val.mean), _num(r.test_best_val.std),
            _num(r.weight_auroc.mean), _num(r.weight_auroc.std), _num(r.seconds_per_step), _num(r.time_vs_ce),
            json.dumps(r.seeds).replace(" ", ""),
        ])
    return buf.getvalue()


def _num(value: Optional[float]) -> str:
    return "" if value is None else repr(float(value))


def make_table(paths: Sequence[str], fmt: str = "md") -> tuple[str, List[str]]:
    """(the table text, notes about skipped or doubtful runs) for run dirs or folders above them.
    Markdown carries the notes under the table; CSV leaves them to the caller (stderr)."""
    if fmt not in ("md", "csv"):
        raise ValueError(f"--format must be md or csv, got {fmt!r}")
    finished, notes = split_finished(find_runs(paths))
    if not finished:
        raise ValueError(f"none of the {len(notes)} runs found is finished; " + "; ".join(notes[:3]))
    rows = build_rows(finished)
    text = format_markdown(rows, notes) if fmt == "md" else format_csv(rows)
    return text, notes
