"""Finding mislabelled examples: nrcore's one-run signals against cleanlab on the same noisy labels.

For every (noise, seed):
  * cleanlab's recommended protocol: `ce` with the same network and schedule trained K times
    (`nrcore train --cv-fold k/K`), each predicting its held-out fold, so every training
    example gets an out-of-fold posterior; `cleanlab.filter.find_label_issues` on those (its
    default, prune by noise rate) flags its label issues, and 1 - its label quality score
    (`cleanlab.rank.get_label_quality_scores`, self-confidence) ranks them;
  * each method's ONE ordinary run (the same runs `bench/accuracy.py` makes, so a grid folder
    can be reused) and every per-example signal it saved (audit.npz: nrcore audit).
Reported per score: AUROC and average precision for finding the mislabelled examples, precision
and recall at cleanlab's own flagged count, and the training compute behind it (cleanlab's K
runs against one). The true labels are used for these numbers only.

    python bench/audit.py --out GRID --dataset mnist10k --noise sym80,unif40,pair40 --seeds 0
    python bench/audit.py --out GRID --dataset cifar10n-cpu --noise worst,random1 --seeds 0
    python bench/audit.py --out GRID ... --dry-run          # what would be trained

Needs cleanlab (`pip install 'nrcore[audit]'`). Runs that are missing are trained first, one
after another in this process (or `--jobs N` subprocesses), resumable like bench/accuracy.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ siblings, also when loaded by path
from accuracy import GridRun, classify, default_data_dir, run_grid  # noqa: E402
from variants import parse_variant, split_variants  # noqa: E402

DEFAULT_METHODS = {
    "mnist10k": "ce,fbr,fbr-ntk,meta,ebomlc:meta_lr=0.003,glc,coteaching",
    "cifar10n-cpu": "ce,fbr,fbr-ntk,meta,ebomlc:meta_lr=0.003,glc,coteaching",
}
FOLD_METHOD = "ce"


def fold_dir(out: Path, dataset: str, noise: str, seed: int, k: int, folds: int) -> Path:
    return out / dataset / noise / f"{FOLD_METHOD}_cv-fold-{k}-of-{folds}" / f"seed{seed}"


def plan(args) -> List[GridRun]:
    """Every run the comparison needs: each method's ordinary run and the K fold runs of ce."""
    from nrcore.methods import registry
    from nrcore.train import resolve_config

    reg = registry()
    out = Path(args.out)
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for noise in args.noise.split(","):
            base = {"dataset": args.dataset, "noise": noise, "seed": seed, "data_dir": args.data_dir}
            for key in ("threads", "epochs"):
                if getattr(args, key):
                    base[key] = getattr(args, key)
            for text in split_variants(args.methods or DEFAULT_METHODS.get(args.dataset, DEFAULT_METHODS["mnist10k"])):
                variant = parse_variant(text, reg)
                cfg = resolve_config(cli={**base, "method": variant.method}, cli_method_options=dict(variant.options))
                runs.append(GridRun(variant, noise, seed, out / args.dataset / noise / variant.slug / f"seed{seed}", cfg))
            fold_variant = parse_variant(FOLD_METHOD, reg)
            for k in range(1, args.folds + 1):
                cfg = resolve_config(cli={**base, "method": FOLD_METHOD, "cv_fold": f"{k}/{args.folds}"}, cli_method_options={})
                runs.append(GridRun(fold_variant, noise, seed, fold_dir(out, args.dataset, noise, seed, k, args.folds), cfg))
    for run in runs:
        run.state, run.detail = classify(run)
    return runs


def out_of_fold_probs(fold_runs: Sequence[Path], source_index: np.ndarray) -> np.ndarray:
    """[n, C] posteriors of every training example from the fold run that held it out, in the
    row order of `source_index` (the training split of an ordinary run of the same seed)."""
    row_of = {int(s): i for i, s in enumerate(source_index)}
    probs: Optional[np.ndarray] = None
    filled = np.zeros(len(source_index), dtype=bool)
    for run_dir in fold_runs:
        with np.load(run_dir / "audit.npz", allow_pickle=False) as f:
            held, index = f["holdout__probs"], f["holdout__source_index"]
        if probs is None:
            probs = np.zeros((len(source_index), held.shape[1]))
        rows = np.array([row_of[int(s)] for s in index])
        probs[rows], filled[rows] = held, True
    if probs is None or not filled.all():
        raise ValueError(f"the fold runs cover {int(filled.sum())} of {len(source_index)} training examples")
    return probs


def _train_seconds(run_dir: Path) -> float:
    return float(json.loads((run_dir / "summary.json").read_text())["train_seconds"])


def compare(runs: List[GridRun], folds: int) -> List[dict]:
    """One row per score per (noise, seed): cleanlab's, then each method's signals."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    from nrcore.audit import average_precision, load_audit
    from nrcore.audit.core import auroc

    rows = []
    cells: Dict[tuple, List[GridRun]] = {}
    for run in runs:
        cells.setdefault((run.noise, run.seed), []).append(run)
    for (noise, seed), members in cells.items():
        ordinary = [r for r in members if r.cfg.cv_fold is None]
        fold_runs = [r.run_dir for r in members if r.cfg.cv_fold is not None]
        reference = load_audit(ordinary[0].run_dir)
        given, true = reference.given, reference.true
        noisy = given != true
        probs = out_of_fold_probs(fold_runs, reference.source_index)
        issues = find_label_issues(labels=given, pred_probs=probs)
        k = int(issues.sum())
        clean_score = 1.0 - get_label_quality_scores(given, probs)
        top = np.argsort(-clean_score, kind="mergesort")[:k]

        def row(label, score, picked, seconds):
            hits = int(noisy[picked].sum())
            return {"noise": noise, "seed": seed, "score": label, "auroc": auroc(score, noisy), "ap": average_precision(score, noisy),
                    "precision": hits / max(len(picked), 1), "recall": hits / max(int(noisy.sum()), 1), "seconds": seconds,
                    "flagged": len(picked), "mislabelled": int(noisy.sum())}  # fmt: skip

        cl_seconds = sum(_train_seconds(d) for d in fold_runs)
        rows.append(row(f"cleanlab (K={folds} ce runs; its {k} flagged)", clean_score, np.flatnonzero(issues), cl_seconds))
        rows.append(row(f"cleanlab ranking, top {k}", clean_score, top, cl_seconds))
        for run in ordinary:
            audit = load_audit(run.run_dir)
            if not np.array_equal(audit.given, given):
                raise ValueError(f"{run.run_dir} trained on other labels than {ordinary[0].run_dir}")
            for name in sorted(audit.signals):
                score = audit.signals[name].score
                picked = np.lexsort((np.arange(len(score)), -score))[:k]
                rows.append(row(f"{run.variant.slug}: {name}", score, picked, _train_seconds(run.run_dir)))
    return rows


def format_rows(rows: List[dict], dataset: str) -> str:
    header = "| dataset | noise | seed | score | AUROC | AP | precision @ k | recall @ k | train s |"
    lines = [header, "|" + "|".join("---" if i < 4 else "---:" for i in range(9)) + "|"]
    for r in rows:
        lines.append(f"| {dataset} | {r['noise']} | {r['seed']} | {r['score']} | {r['auroc']:.3f} | {r['ap']:.3f} | "
                     f"{100 * r['precision']:.1f}% | {100 * r['recall']:.1f}% | {r['seconds']:.0f} |")  # fmt: skip
    lines += ["", "k: cleanlab's flagged count in each (noise, seed); precision/recall of each score's top k. "
              "train s: training seconds behind the score (cleanlab: its K fold runs; nrcore: one run)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--dataset", default="mnist10k")
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--noise", default="sym80,unif40,pair40", help="comma-separated noise specs")
    p.add_argument("--seeds", default="0")
    p.add_argument("--methods", help="comma-separated methods/variants whose one-run signals compete (default: the dataset's list)")
    p.add_argument("--folds", type=int, default=5, help="cleanlab's K (default 5)")
    p.add_argument("--threads", type=int)
    p.add_argument("--epochs", type=int, help="override the dataset's epochs (smoke tests only)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", required=True, help="grid folder (the layout of bench/accuracy.py; an accuracy grid's folder is reused)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.folds < 2:
        p.error("--folds must be >= 2")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    runs = plan(args)
    todo = [r for r in runs if r.state in ("new", "resume")]
    bad = [r for r in runs if r.state in ("stale", "diverged")]
    print(f"audit comparison: {len(runs)} runs, {len(todo)} to train", flush=True)
    for run in bad:
        print(f"  {run.state} {run.name} {run.run_dir} {run.detail}", file=sys.stderr)
    if args.dry_run or bad:
        for run in runs:
            print(f"  {run.state:8s} {run.run_dir}")
        return 2 if bad else 0
    failed = [r for r in run_grid(runs, args.jobs, args.quiet) if not r.finished]
    if failed:
        for run in failed:
            print(f"not finished: {run.name}: {run.outcome}", file=sys.stderr)
        return 1
    print()
    print(format_rows(compare(runs, args.folds), args.dataset), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
