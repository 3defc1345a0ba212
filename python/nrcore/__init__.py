"""nrcore: training classifiers on noisily labelled data, helped by a small trusted subset.

Subpackages:
    nrcore.ops      compiled kernels (centered-Gram reweighting, per-sample Jacobian-kernel
                    products, barrier reductions) with pure-PyTorch twins
    nrcore.data     datasets in their official formats, noise models, trusted/validation splits
    nrcore.models   the backbones used by the papers
    nrcore.methods  one module per method behind the `Method` interface
    nrcore.train    the trainer shared by every method (epochs, evaluation, checkpoints)
"""

__version__ = "0.1.0"
