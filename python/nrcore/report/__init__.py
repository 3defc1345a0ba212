"""Tables and figures of run directories: `nrcore table` and `nrcore report`.

    from nrcore.report import make_table, render_report
    text, notes = make_table(["runs/"], "md")
    render_report(["runs/"], "report/")      # PNGs + index.md

matplotlib is imported only when figures are drawn.
"""

from nrcore.report.runs import Run, find_runs, group_runs
from nrcore.report.table import build_rows, make_table


def render_report(*args, **kwargs):
    """See nrcore.report.figures.render_report (imported on use: it needs matplotlib)."""
    from nrcore.report.figures import render_report as render

    return render(*args, **kwargs)


__all__ = ["Run", "build_rows", "find_runs", "group_runs", "make_table", "render_report"]
