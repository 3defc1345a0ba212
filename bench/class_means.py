"""Which mislabelled examples FBR keeps, and why: the trusted class means of a finished run.

At the default λ± FBR's direction is `d_i ∝ (φ_i - μ)·M_y` (docs/methods-reweighting.md), with
`M_c` the centred mean of the trusted examples of class c, so an example of true class c given
the wrong label y drifts, on average, the way `M_c·M_y` points: up when the two class means point
the same way. For each finished run with per-example weights, from its final network's
penultimate features of the trusted set (train-mode BatchNorm, as FBR computes them):

- `top1`, `top3`: share of the centred class means' energy (squared singular values) on their
  1 and 3 leading directions; symmetric class means (a regular simplex) give 1/(C-1) per direction;
- `pos pairs`: share of the mislabelled training examples whose true-class and label-class
  means have a positive inner product;
- the mean final weight of those (`w pos`), of the other mislabelled examples (`w neg`) and of
  the clean ones (`w clean`);
- the weight AUROC (clean vs mislabelled) over all training examples, and with the positive-pair
  mislabelled examples left out.

    python bench/class_means.py RUN_DIR [RUN_DIR ...]
    python bench/class_means.py GRID/mnist10k/sym80/fbr/seed*

Uses the true labels: analysis only. Any method whose checkpoint holds one network as "model"
works (fbr, fbr-ntk, meta, l2rw, mwnet); the features are always the penultimate ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch


def centred_class_means(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, d]: the mean of each class's features minus the mean of all (rows of absent classes
    are zero, so they pair with nothing)."""
    centred = feats - feats.mean(0)
    sums = torch.zeros(num_classes, feats.shape[1], dtype=feats.dtype).index_add_(0, labels, centred)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(feats.dtype)
    return sums / counts[:, None]


def positive_pairs(means: torch.Tensor, given: np.ndarray, true: np.ndarray) -> np.ndarray:
    """[N] bool: example's true-class mean and label-class mean have a positive inner product."""
    gram = (means @ means.T).numpy()
    return gram[true, given] > 0


def run_report(run) -> Dict[str, float]:
    """The numbers above for one finished run (a nrcore.report.runs.Run with weights and labels)."""
    from nrcore.data import load_task_labels
    from nrcore.models.inference import split_features
    from nrcore.train.metrics import auroc
    from nrcore.train.trainer import load_final_model

    run_dir = run.path
    cfg, task, model = load_final_model(run_dir)
    model.train()
    feats, labels = split_features(model, task, "clean", cfg.batch_size, torch.device("cpu"))
    means = centred_class_means(feats.double(), labels, task.num_classes)
    energy = torch.linalg.svdvals(means) ** 2
    energy = energy / energy.sum()

    labels_saved = load_task_labels(run_dir)
    given, true = labels_saved["train_labels"], labels_saved["train_true_labels"]
    with np.load(run.weights_file) as data:
        weights = np.asarray(data["final_weights"], dtype=float)
    if not len(weights) == len(given) == len(true):
        raise ValueError(f"{run_dir}: {len(weights)} weights but {len(given)} training labels")
    known = true >= 0
    given, true, weights = given[known], true[known], weights[known]
    noisy = given != true
    pos = noisy & positive_pairs(means, given, true)
    rest = ~pos  # clean examples and mislabelled ones with a non-positive pair
    return {
        "top1": float(energy[:1].sum()), "top3": float(energy[:3].sum()),
        "pos_pairs": float(pos.sum() / max(noisy.sum(), 1)),
        "w_pos": float(weights[pos].mean()) if pos.any() else float("nan"),
        "w_neg": float(weights[noisy & ~pos].mean()) if (noisy & ~pos).any() else float("nan"),
        "w_clean": float(weights[~noisy].mean()) if (~noisy).any() else float("nan"),
        "auroc": auroc(torch.from_numpy(weights), torch.from_numpy(~noisy)),
        "auroc_without_pos": auroc(torch.from_numpy(weights[rest]), torch.from_numpy(~noisy[rest])),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories with weights.npz and checkpoint.pt")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from nrcore.report.runs import load_run

    print("| run | top1 | top3 | pos pairs | w pos | w neg | w clean | AUROC | AUROC without pos |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    fmt = lambda v, digits=2: "n/a" if v is None or v != v else f"{v:.{digits}f}"  # noqa: E731
    for run in args.runs:
        saved = load_run(run)
        missing = [what for what, there in (("checkpoint.pt", (run / "checkpoint.pt").is_file()),
                                            ("weights.npz", saved.weights_file is not None),
                                            ("training labels", saved.train_label_files is not None)) if not there]
        if missing:
            print(f"- skipped {run}: no {', '.join(missing)} (not a finished run with per-example weights)", file=sys.stderr)
            continue
        r = run_report(saved)
        print(f"| {run} | {fmt(r['top1'])} | {fmt(r['top3'])} | {fmt(r['pos_pairs'])} | {fmt(r['w_pos'])} | {fmt(r['w_neg'])} "
              f"| {fmt(r['w_clean'])} | {fmt(r['auroc'], 3)} | {fmt(r['auroc_without_pos'], 3)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
