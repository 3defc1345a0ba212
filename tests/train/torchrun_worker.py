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
        plan = json.loads(open(plan_path).read())
        for i, run in enumerate(plan):
            # says where a failing rank was (the test shows the start and end of stderr)
            print(f"rank {ranks.rank}: run {i + 1}/{len(plan)}: {run['cli'].get('method')}", file=sys.stderr, flush=True)
            if run.get("skip_grad_sum"):
                parallel.Ranks.sum_grads_ = lambda self, params: None
            cfg = resolve_config(cli=run["cli"], cli_method_options=run.get("options", {}))
            train(cfg, run["out"], stop_after_epoch=run.get("stop_after_epoch"))
    finally:
        parallel.stop(ranks)
    print(f"rank {ranks.rank}: plan done, group left", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
    from nrcore import parallel

    parallel.end_process(0)  # as the CLI does under torchrun: no interpreter teardown (see there)
