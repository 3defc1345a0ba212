"""Why a transition-corrected run (`forward`, `glc`) scored what it did.

For each finished run directory, from its `transition.json` (the matrix used and the true one):

- `err`: mean row L1 distance between them (0..2);
- `opt ok`: for how many true classes i the posterior that minimises the *expected* corrected
  loss, `min_p -sum_y T_true[i, y] log (p^T T_used)[y]` over the simplex, puts its largest mass on
  i. A network flexible enough to reach that optimum would still misclassify the other classes,
  so this separates a bad matrix from a bad optimisation; `opt min` is the smallest `p*[i, i]`.

and, unless `--no-model`, from its `checkpoint.pt` (the final network) on the test split:

- `acc`, `dead`: the classes the network never predicts, and the per-class recall.

    python bench/transition_check.py RUN_DIR [RUN_DIR ...]
    python bench/transition_check.py GRID/mnist10k/sym80/forward/seed*

The numbers use the true labels and the true matrix: analysis only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch


def corrected_loss_optimum(true_matrix: torch.Tensor, used_matrix: torch.Tensor, iters: int = 20000) -> torch.Tensor:
    """Row i: the p on the simplex maximising `sum_y true[i, y] log (p @ used)[y]`.

    That is the log-likelihood of mixture weights p over the fixed components `used[j]`, concave
    in p, so the EM update `p_j <- p_j sum_y true[i, y] used[j, y] / (p @ used)[y]` climbs to the
    global optimum from the uniform start (it keeps p on the simplex when the rows of `used`
    sum to 1)."""
    if true_matrix.shape != used_matrix.shape or true_matrix.dim() != 2 or true_matrix.shape[0] != true_matrix.shape[1]:
        raise ValueError(f"true_matrix and used_matrix must be the same square shape, got {tuple(true_matrix.shape)} and {tuple(used_matrix.shape)}")
    q, t = true_matrix.double(), used_matrix.double()
    if (t < 0).any() or not torch.allclose(t.sum(1), torch.ones(len(t), dtype=t.dtype), atol=1e-6):
        raise ValueError("used_matrix must have non-negative rows summing to 1")
    p = torch.full_like(q, 1.0 / len(q))
    for _ in range(iters):
        p = p * ((q / (p @ t).clamp_min(1e-300)) @ t.T)
    return p


def transition_report(run_dir: Path) -> Dict:
    info = json.loads((run_dir / "transition.json").read_text())
    if info.get("true") is None:
        raise ValueError(f"{run_dir}: transition.json has no true matrix (real noise): nothing to compare with")
    optimum = corrected_loss_optimum(torch.tensor(info["true"]), torch.tensor(info["used"]))
    right = optimum.argmax(1) == torch.arange(len(optimum))
    return {"err": info.get("row_l1_error"), "opt_ok": int(right.sum()), "classes": len(optimum), "opt_min": float(optimum.diag().min())}


def model_report(run_dir: Path) -> Dict:
    """Test accuracy, never-predicted classes and per-class recall of the run's final network."""
    from nrcore.models.inference import predict_split
    from nrcore.train.trainer import load_final_model

    _, task, model = load_final_model(run_dir)
    probs, labels = predict_split(model, task, "test", 1000, torch.device("cpu"))
    pred = probs.argmax(1)
    recall = [float((pred[labels == k] == k).float().mean()) if (labels == k).any() else float("nan") for k in range(task.num_classes)]
    dead = [k for k in range(task.num_classes) if not (pred == k).any()]
    return {"acc": float((pred == labels).float().mean()) * 100, "dead": dead, "recall": recall}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories holding transition.json (forward with an estimated or true matrix, glc)")
    parser.add_argument("--no-model", action="store_true", help="only the matrix analysis (no checkpoint, no data needed)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print("| run | err | opt ok | opt min | test acc | never predicted | recall per class (%) |")
    print("|---|---:|---:|---:|---:|---|---|")
    for run in args.runs:
        if not (run / "transition.json").is_file():
            print(f"- skipped {run}: no transition.json (not a finished forward/glc run)", file=sys.stderr)
            continue
        t = transition_report(run)
        row = f"| {run} | {t['err']:.2f} | {t['opt_ok']}/{t['classes']} | {t['opt_min']:.2f} |"
        if args.no_model:
            print(row + " | | |")
            continue
        m = model_report(run)
        recall = " ".join(f"{100 * r:.0f}" for r in m["recall"])
        print(row + f" {m['acc']:.2f} | {', '.join(map(str, m['dead'])) or '-'} | {recall} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
