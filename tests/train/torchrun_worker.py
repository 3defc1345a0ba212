"""Run under torchrun by tests/train/test_train_torchrun.py: trains each run of a JSON plan
[{"cli": {...train settings...}, "options": {...method options...}, "out": DIR}, ...] in turn,
in one process group (one launch for many runs keeps the tests fast). A run with
"skip_grad_sum": true breaks the gradient sum over the ranks on purpose (the trainer must notice)."""

import json
import sys


def main(plan_path: str) -> None:
    import torch

    from nrcore import parallel
    from nrcore.train import resolve_config, train

    torch.set_num_threads(1)
    ranks, _ = parallel.start(torch.device("cpu"))  # joined once; each train() finds the group joined
    try:
        for run in json.loads(open(plan_path).read()):
            if run.get("skip_grad_sum"):
                parallel.Ranks.sum_grads_ = lambda self, params: None
            cfg = resolve_config(cli=run["cli"], cli_method_options=run.get("options", {}))
            train(cfg, run["out"], stop_after_epoch=run.get("stop_after_epoch"))
    finally:
        parallel.stop(ranks)


if __name__ == "__main__":
    main(sys.argv[1])
