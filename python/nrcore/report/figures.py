"""`nrcore report`: PNG figures of finished runs and an `index.md` that shows them.

Figures (matplotlib, Agg backend: no display needed):

    accuracy_<dataset>_<noise>_<model>.png    test and clean-validation accuracy per epoch,
                                              one line per run, one colour per method, a dot
                                              at each run's best-validation epoch; phased
                                              methods (glc, forward) show their second phase
    weight-auroc_<dataset>_<noise>_<model>.png per-example-weight methods: weight AUROC per
                                              epoch, and mean weight of clean vs noisy examples
    trajectories_<run>.png                    weights of the tracked examples over training,
                                              clean vs noisy (FBR paper, Fig. 1a)
    weight-hist_<run>.png                     final weights of all training examples, clean vs
                                              noisy (FBR paper, Fig. 1e)
    weight-pairs_<run>.png                    mean final weight for each (true class, training
                                              label) pair: which mislabelled examples a
                                              method keeps (from labels/ and weights.npz)
    label-correction_<run>.png                true label vs noisy label and vs the meta model's
                                              corrected label, rows normalised (EBOMLC Fig. 6)

Per-run figures are drawn for the lowest seed of each table row unless `every_seed` is set
(a 3-seed grid would otherwise triple them without showing anything new).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nrcore.report.runs import Run, RowKey, find_runs, group_runs, split_finished

CLEAN_COLOR = "tab:blue"
NOISY_COLOR = "tab:red"
BASELINE_COLOR = "black"
DPI = 110


def _pyplot():
    """pyplot on the headless Agg backend (imported here only: never at package import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+=-]+", "_", text).strip("_")


def method_styles(labels: Sequence[str]) -> Dict[str, Dict[str, object]]:
    """Line colour and style per method label within one figure: `ce` solid black; up to 10
    others in tab10 colours; more in tab20, whose light half is dashed so neighbours differ."""
    plt = _pyplot()
    others = sorted(set(labels) - {"ce"})
    cmap = plt.get_cmap("tab10" if len(others) <= 10 else "tab20")
    styles = {
        label: {"color": cmap(i % cmap.N), "ls": "--" if cmap.N == 20 and i % 2 else "-"} for i, label in enumerate(others)
    }
    styles["ce"] = {"color": BASELINE_COLOR, "ls": "-"}
    return styles


def _noise_title(dataset: str, noise: str, model: str, runs: Sequence[Run]) -> str:
    rates = [r.summary.get("noise_rate_realized") for r in runs if r.summary and r.summary.get("noise_rate_realized") is not None]
    realised = f" (realised {100 * float(np.mean(rates)):.1f}%)" if rates and noise != "clean" else ""
    return f"{dataset}, noise {noise}{realised}, model {model}"


def _run_title(run: Run, label: str) -> str:
    return f"{label} on {run.dataset}, noise {run.noise}, seed {run.seed}"


def _is_phased(run: Run) -> bool:
    return run.result_metrics[1] > 0


def _series(run: Run, key: str) -> Tuple[np.ndarray, np.ndarray]:
    records, offset = run.result_metrics  # phased methods: the last phase, from epoch 1
    points = [(m["epoch"] - offset, m[key]) for m in records if m.get(key) is not None]
    if not points:
        return np.empty(0), np.empty(0)
    epochs, values = zip(*points)
    return np.asarray(epochs, dtype=float), np.asarray(values, dtype=float)


def _line(ax, x, y, **style):
    """A run's curve; dots when it has too few epochs to draw a line."""
    return ax.plot(x, y, lw=1.3, alpha=0.85, marker="o" if len(x) < 3 else None, ms=4, **style)[0]


def _lr_drops(runs: Sequence[Run]) -> List[float]:
    """Epochs (x positions between two epochs) where some run's learning rate fell by >25%."""
    drops = set()
    for run in runs:
        x, lr = _series(run, "lr")
        drops.update(float(x[i]) - 0.5 for i in range(1, len(lr)) if lr[i] < 0.75 * lr[i - 1])
    return sorted(drops)


def _split_size(runs: Sequence[Run], split: str) -> str:
    sizes = {((r.summary or {}).get("task") or {}).get("sizes", {}).get(split) for r in runs} - {None}
    return f", {sizes.pop()} examples" if len(sizes) == 1 else ""


def _legend_right(fig, handles, labels):
    fig.legend(handles, labels, loc="outside right center", frameon=False)


def _epoch_axis(ax, label: str = "epoch") -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


# ---- figures over all runs of a (dataset, noise, model) --------------------------------------
def plot_accuracy(rows: Dict[RowKey, List[Run]], path: Path) -> Path:
    """Test accuracy (and clean-validation accuracy when logged) per epoch, a line per run."""
    plt = _pyplot()
    runs = [r for members in rows.values() for r in members]
    has_val = any(_series(r, "val_acc")[0].size for r in runs)
    fig, axes = plt.subplots(
        1, 2 if has_val else 1, figsize=(12 if has_val else 7.5, 4.4), sharey=True, squeeze=False, layout="constrained"
    )
    panels = [("test_acc", f"test set{_split_size(runs, 'test')}")]
    if has_val:
        panels.append(("val_acc", f"clean validation split{_split_size(runs, 'val')}"))
    styles = method_styles([k.label for k in rows])
    last_epoch = max((_series(r, "test_acc")[0].max(initial=1) for r in runs), default=1)
    handles, names = [], []
    for ax, (key, title) in zip(axes[0], panels):
        for row_key, members in rows.items():
            style = styles[row_key.label]
            color = style["color"]
            for i, run in enumerate(members):
                x, y = _series(run, key)
                line = _line(ax, x, y, **style)
                if ax is axes[0][0] and i == 0:
                    handles.append(line)
                    phased = ", phase 2" if _is_phased(run) else ""
                    names.append(f"{row_key.label}{phased} ({_seeds(len(members))})")
                if key == "test_acc" and run.best_val_epoch is not None:
                    ax.plot([run.best_val_epoch], [run.test_acc_best_val], "o", color=color, ms=5)
        for drop in _lr_drops(runs):
            ax.axvline(drop, color="grey", ls=":", lw=1)
        ax.set_title(title)
        ax.set_xlim(0.5, last_epoch + 0.5)
        _epoch_axis(ax)
    axes[0][0].set_ylabel("accuracy (%)")
    from matplotlib.lines import Line2D

    if any(r.best_val_epoch is not None for r in runs):
        handles.append(Line2D([], [], color="grey", marker="o", ls=""))
        names.append("test acc at best-val epoch")
    if _lr_drops(runs):
        handles.append(Line2D([], [], color="grey", ls=":"))
        names.append("learning-rate decay")
    first = next(iter(rows))
    fig.suptitle(f"Accuracy per epoch: {_noise_title(first.dataset, first.noise, first.model, runs)}")
    _legend_right(fig, handles, names)
    return _save(fig, path)


def plot_weight_auroc(rows: Dict[RowKey, List[Run]], path: Path) -> Path:
    """Weight AUROC (clean vs noisy) per epoch, and the mean weight of clean and noisy examples."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, (ax_auc, ax_mean) = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained")
    styles = method_styles([k.label for k in rows])  # colour only: line style marks clean vs noisy here
    handles, names = [], []
    for row_key, members in rows.items():
        color = styles[row_key.label]["color"]
        for run in members:
            _line(ax_auc, *_series(run, "weight_auroc"), color=color)
            _line(ax_mean, *_series(run, "weight_mean_clean"), color=color)
            _line(ax_mean, *_series(run, "weight_mean_noisy"), color=color, ls="--")
        handles.append(Line2D([], [], color=color, lw=2))
        names.append(f"{row_key.label} ({_seeds(len(members))})")
    ax_auc.axhline(0.5, color="grey", ls=":", lw=1)
    handles += [Line2D([], [], color="grey", ls=":"), Line2D([], [], color="grey", ls="-"), Line2D([], [], color="grey", ls="--")]
    names += ["chance (AUROC 0.5)", "mean weight, clean examples", "mean weight, noisy examples"]
    ax_auc.set(title="weight AUROC, clean vs noisy (1 = perfect)", ylabel="AUROC")
    ax_mean.set(title="mean weight", ylabel="mean example weight")
    for ax in (ax_auc, ax_mean):
        _epoch_axis(ax)
    runs = [r for members in rows.values() for r in members]
    first = next(iter(rows))
    fig.suptitle(f"Per-example weights: {_noise_title(first.dataset, first.noise, first.model, runs)}")
    _legend_right(fig, handles, names)
    return _save(fig, path)


# ---- per-run figures --------------------------------------------------------------------------
def plot_weight_trajectories(run: Run, label: str, path: Path) -> Optional[Path]:
    """Weights of the tracked examples from before training (epoch 0) to the end."""
    plt = _pyplot()
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    with np.load(run.weights_file) as data:
        if "trajectories" not in data:
            return None
        traj = np.asarray(data["trajectories"], dtype=float)  # [T, k]
        noisy = np.asarray(data["tracked_is_noisy"], dtype=bool)
        # fractional epochs of each row (several per epoch); older runs stored one row per epoch
        epochs = np.asarray(data["trajectory_epochs"], dtype=float) if "trajectory_epochs" in data else np.arange(traj.shape[0])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    # noisy first so the (usually fewer) clean lines stay visible on top
    for mask, color in ((noisy, NOISY_COLOR), (~noisy, CLEAN_COLOR)):
        segments = [np.column_stack([epochs, traj[:, j]]) for j in np.flatnonzero(mask)]
        ax.add_collection(LineCollection(segments, colors=color, linewidths=0.6, alpha=0.18))
    for mask, color in ((noisy, NOISY_COLOR), (~noisy, CLEAN_COLOR)):
        if mask.any():
            ax.plot(epochs, traj[:, mask].mean(1), color=color, lw=2.8, path_effects=_outline())
    ax.autoscale()
    ax.set(ylabel="example weight", xlim=(0, max(epochs[-1], 1)))
    _epoch_axis(ax, "epoch (0 = before training)")
    handles = [
        Line2D([], [], color=CLEAN_COLOR, lw=1, alpha=0.6), Line2D([], [], color=NOISY_COLOR, lw=1, alpha=0.6),
        Line2D([], [], color=CLEAN_COLOR, lw=2.8), Line2D([], [], color=NOISY_COLOR, lw=2.8),
    ]
    names = [f"clean example ({(~noisy).sum()})", f"noisy example ({noisy.sum()})", "mean of clean", "mean of noisy"]
    ax.legend(handles, names, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # outside: never over the lines
    ax.set_title(f"Weight trajectories of {len(noisy)} tracked training examples\n{_run_title(run, label)}")
    return _save(fig, path)


def _outline():
    import matplotlib.patheffects as pe

    return [pe.Stroke(linewidth=4.2, foreground="white"), pe.Normal()]


def plot_weight_histogram(run: Run, label: str, path: Path) -> Path:
    """Final weights of every training example: clean above, noisy below, same bins, each with
    its own count axis (with 80% noise, one shared axis would flatten the clean examples, and
    overlapping bars read as stacked ones)."""
    plt = _pyplot()
    with np.load(run.weights_file) as data:
        weights = np.asarray(data["final_weights"], dtype=float)
        noisy = np.asarray(data["is_noisy"], dtype=bool)
    lo, hi = min(0.0, float(weights.min())), max(1.0, float(weights.max()))
    bins = np.linspace(lo, hi, 41)
    fig, axes = plt.subplots(2, 1, figsize=(7, 5.2), sharex=True, layout="constrained")
    for ax, mask, color, kind in ((axes[0], ~noisy, CLEAN_COLOR, "clean"), (axes[1], noisy, NOISY_COLOR, "noisy")):
        values = weights[mask]
        mean = f", mean {values.mean():.2f}" if values.size else ""
        ax.hist(values, bins=bins, color=color, alpha=0.75, label=f"{kind}: {values.size} examples{mean}")
        ax.set_ylabel("examples")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center")
    axes[1].set_xlabel("final example weight")
    auroc = (run.summary or {}).get("weight_auroc_last")
    auroc_text = f" (weight AUROC {auroc:.3f})" if auroc is not None else ""
    fig.suptitle(f"Final weights of all training examples, clean vs noisy{auroc_text}\n{_run_title(run, label)}")
    return _save(fig, path)


def weight_by_label_pair(weights: np.ndarray, given: np.ndarray, true: np.ndarray, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """(mean weight [C, C], example count [C, C]) over training examples grouped by (true class,
    training label); NaN where a pair has no example. Examples with an unknown true label (-1)
    are left out. The diagonal holds the clean examples, the rest the mislabelled ones."""
    weights, given, true = (np.asarray(a).reshape(-1) for a in (weights, given, true))
    if not weights.shape == given.shape == true.shape:
        raise ValueError(f"{weights.size} weights but {given.size} training labels and {true.size} true labels")
    known = true >= 0
    cells = true[known].astype(np.int64) * num_classes + given[known].astype(np.int64)
    counts = np.bincount(cells, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    sums = np.bincount(cells, weights=weights[known].astype(float), minlength=num_classes * num_classes)
    means = np.divide(sums.reshape(num_classes, num_classes), counts, out=np.full(counts.shape, np.nan), where=counts > 0)
    return means, counts


def _listed_class_names(run: Run) -> List[str]:
    """The task's class names as the run's summary.json lists them ([] when it does not)."""
    names = ((run.summary or {}).get("task") or {}).get("class_names")
    return names if isinstance(names, list) else []


def _class_names(run: Run, classes: int) -> List[str]:
    names = _listed_class_names(run)
    return names if len(names) == classes else [str(c) for c in range(classes)]


def _class_ticks(ax, names: Sequence[str]) -> None:
    step = max(1, len(names) // 20)  # at most ~20 tick labels
    ticks = np.arange(0, len(names), step)
    ax.set_xticks(ticks, [names[t] for t in ticks], rotation=90 if max(map(len, names)) > 2 else 0)
    ax.set_yticks(ticks, [names[t] for t in ticks])


def plot_weight_by_label_pair(run: Run, label: str, path: Path) -> Path:
    """Mean final weight of the training examples of each (true class, training label) pair: the
    diagonal is the clean examples, an off-diagonal cell the examples of one true class given
    one wrong label. Shows which mislabelled examples a method keeps (e.g. those whose wrong
    label is a class the model's features do not yet tell apart from the true one)."""
    plt = _pyplot()
    if run.train_label_files is None:
        raise ValueError("no labels/train_labels.npy and labels/train_true_labels.npy")
    given, true = (np.load(f) for f in run.train_label_files)
    with np.load(run.weights_file) as data:
        weights = np.asarray(data["final_weights"], dtype=float)
    known = true >= 0
    if not known.any():
        raise ValueError("the true training labels are unknown (-1)")
    classes = max(int(max(given.max(), true.max())) + 1, len(_listed_class_names(run)))
    means, counts = weight_by_label_pair(weights, given, true, classes)
    names = _class_names(run, classes)
    clean, noisy = (weights[known & mask] for mask in (given == true, given != true))
    mean = lambda w: f"{w.mean():.2f}" if w.size else "n/a"  # noqa: E731
    fig, ax = plt.subplots(figsize=(6.6, 5.6), layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")  # grey: pairs without examples
    image = ax.imshow(np.ma.masked_invalid(means), cmap=cmap, vmin=0, vmax=max(1.0, float(np.nanmax(means))))
    ax.set(xlabel="training label", ylabel="true class")
    _class_ticks(ax, names)
    if classes <= 12:
        for i in range(classes):
            for j in range(classes):
                if counts[i, j]:
                    ax.text(j, i, f"{means[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if means[i, j] > 0.6 else "white")
    fig.colorbar(image, ax=ax, shrink=0.85).set_label("mean final weight (grey: no examples)")
    ax.set_title(f"Mean final weight by true class and training label\n{_run_title(run, label)}\n"
                 f"diagonal (clean examples) {mean(clean)}, off-diagonal (mislabelled) {mean(noisy)}")
    return _save(fig, path)


def plot_label_correction(run: Run, label: str, path: Path) -> Path:
    """Row-normalised confusion of the true label with the noisy label (what training saw) and
    with the meta model's corrected label (what MLC-style methods train on instead)."""
    plt = _pyplot()
    with np.load(run.label_correction_file) as data:
        panels = [("noisy_confusion", "noisy label"), ("confusion", "meta-model corrected label")]
        mats = [(np.asarray(data[k], dtype=float), name) for k, name in panels if k in data]
    if not mats:
        raise ValueError(f"{run.label_correction_file} holds neither 'confusion' nor 'noisy_confusion'")
    classes = mats[0][0].shape[0]
    names = _class_names(run, classes)
    fig, axes = plt.subplots(1, len(mats), figsize=(5.2 * len(mats) + 1, 5), squeeze=False)
    image = None
    for ax, (counts, name) in zip(axes[0], mats):
        totals = counts.sum(1, keepdims=True)
        frac = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        agree = 100 * np.trace(counts) / max(counts.sum(), 1)
        image = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        ax.set(title=f"true vs {name}\n(agree on {agree:.1f}% of examples)", xlabel=name, ylabel="true label")
        _class_ticks(ax, names)
        if classes <= 12:
            for i in range(classes):
                for j in range(classes):
                    if frac[i, j] >= 0.005:
                        ax.text(j, i, f"{100 * frac[i, j]:.0f}", ha="center", va="center", fontsize=7,
                                color="white" if frac[i, j] > 0.55 else "black")
    bar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85)
    bar.set_label("fraction of the true class (rows sum to 1" + ("; cells in %)" if classes <= 12 else ")"))
    fig.suptitle(f"Label correction on the training set: {_run_title(run, label)}")
    return _save(fig, path)


def plot_label_issues(run: Run, label: str, path: Path) -> Optional[Path]:
    """Precision-recall curves of each of the run's audit signals (nrcore audit) for finding its
    mislabelled training examples; None when the run does not know its true labels."""
    from nrcore.audit.core import average_precision, load_audit, precision_recall_curve

    audit = load_audit(run.path)
    if not audit.knows_truth:
        return None
    noisy = audit.given != audit.true
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    for name in sorted(audit.signals, key=lambda n: n != audit.default):
        score = audit.signals[name].score
        recall, precision = precision_recall_curve(score, noisy)
        mark = ", default" if name == audit.default else ""
        ax.plot(recall, precision, lw=2 if mark else 1.2, label=f"{name}{mark} (AP {average_precision(score, noisy):.3f})")
    ax.axhline(noisy.mean(), color="grey", ls=":", lw=1, label=f"chance ({100 * noisy.mean():.1f}% mislabelled)")
    ax.set(xlabel="recall (mislabelled examples found)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title(f"Finding the mislabelled training examples: {_run_title(run, label)}")
    ax.legend(loc="lower left", frameon=False)
    return _save(fig, path)


# ---- the report -------------------------------------------------------------------------------
@dataclass
class Report:
    out: Path
    index: Path
    figures: List[Path] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def render_report(paths: Sequence[str], out: str | Path, every_seed: bool = False) -> Report:
    """Figures and index.md for the finished runs at or below `paths`."""
    from nrcore.report.table import build_rows, format_markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = find_runs(paths)
    finished, notes = split_finished(runs)
    if not finished:
        raise ValueError(f"none of the {len(runs)} runs found is finished; " + "; ".join(notes[:3]))
    rows = group_runs(finished)
    report = Report(out=out, index=out / "index.md", notes=notes)
    table_rows = build_rows(finished)

    md = [
        "# nrcore report",
        "",
        f"{len(finished)} finished runs from {', '.join(f'`{p}`' for p in paths)}, "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.",
        "",
        "## Table",
        "",
        format_markdown(table_rows),
    ]
    by_setting: Dict[Tuple[str, str, str], Dict[RowKey, List[Run]]] = {}
    for key, members in rows.items():
        by_setting.setdefault((key.dataset, key.noise, key.model), {})[key] = members

    taken: set = set()

    def figure_path(kind: str, *parts: str) -> Path:
        stem = _safe(f"{kind}_{'_'.join(parts)}")
        name, k = f"{stem}.png", 2
        while name in taken:
            name, k = f"{stem}-{k}.png", k + 1
        taken.add(name)
        return out / name

    def show(path: Optional[Path], alt: str) -> None:
        if path is not None:
            report.figures.append(path)
            md.extend([f"![{alt}]({path.name})", ""])

    for (dataset, noise, model), group in by_setting.items():
        md += [f"## {dataset}, noise {noise}, model {model}", ""]
        show(plot_accuracy(group, figure_path("accuracy", dataset, noise, model)), "accuracy per epoch")

        weighted = {k: [r for r in v if any(m.get("weight_auroc") is not None for m in r.metrics)] for k, v in group.items()}
        weighted = {k: v for k, v in weighted.items() if v}
        if weighted:
            md += ["### Per-example weights", ""]
            show(plot_weight_auroc(weighted, figure_path("weight-auroc", dataset, noise, model)), "weight AUROC per epoch")

        for key, members in group.items():
            for run in members if every_seed else members[:1]:
                name = f"{dataset}_{noise}_{model}_{key.label}_seed{run.seed}"
                wanted = []
                if run.weights_file is not None:
                    wanted += [(plot_weight_trajectories, "trajectories", "weight trajectories"),
                               (plot_weight_histogram, "weight-hist", "final weight histogram")]
                    if run.train_label_files is not None:
                        wanted.append((plot_weight_by_label_pair, "weight-pairs", "weight by label pair"))
                if run.label_correction_file is not None:
                    wanted.append((plot_label_correction, "label-correction", "label correction heatmap"))
                if (run.path / "audit.npz").is_file():
                    wanted.append((plot_label_issues, "label-issues", "precision-recall of the audit signals"))
                per_run = []
                for plot, kind, alt in wanted:
                    try:
                        drawn = plot(run, key.label, figure_path(kind, name))
                    except (OSError, KeyError, ValueError) as exc:  # one damaged file must not sink the report
                        report.notes.append(f"no {alt} for {run.path}: {type(exc).__name__}: {exc}")
                        continue
                    if drawn is not None:
                        per_run.append((drawn, alt))
                if per_run:
                    md += [f"### {key.label}, seed {run.seed}", "", f"Run directory: `{run.path}`", ""]
                    for path, alt in per_run:
                        show(path, alt)
        if not every_seed and any(len(v) > 1 for v in group.values()):
            md += ["Per-run figures show the lowest seed of each method (`nrcore report --every-seed` draws all).", ""]

    if report.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    report.index.write_text("\n".join(md))
    return report
