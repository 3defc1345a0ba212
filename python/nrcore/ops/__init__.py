"""nrcore.ops: the compiled kernels behind the methods, with pure-PyTorch twins.

Three families (docs/ops.md has the formulas, shapes and back ends):

FBR (feature-based reweighting, closed form of Algorithm 1)
    fbr_prepare(clean_feats, clean_labels, num_classes, *, center=True) -> FBRStats
    fbr_direction(feats, labels, stats, *, lambda_pos=1.0, lambda_neg=None, row_shift=True,
                  label_sign=True, normalize=False) -> [B]
    fbr_update_(weights, index, direction, step_size) -> weights
    centered_gram(feats, clean_feats, mean=None) -> [B, m]

Per-sample Jacobian-kernel products
    tangent_kernel(acts_a, grads_a, acts_b, grads_b, *, strategy="auto") -> [B, M]
    tangent_dot(acts, grads, direction, *, strategy="auto") -> [B] or [B, k]
    conv_tangent_dot / conv_tangent_kernel: the same for a Conv2d layer from its input and output
        gradient, patches gathered inside the kernel
    PerSampleGradRecorder(model, layers=None): record a forward/backward, then dot / dot_many /
        kernel / weighted_sum over Linear, Conv2d and BatchNorm layers

Barrier reductions (MLC-D / EBOMLC)
    barrier_stats(grads_f_w, grads_q_w, grads_q_alpha) -> [4] float64
    barrier_coefficient(stats, delta) -> 0-d float64
    barrier_combine_(outs, grads_f, grads_q, coef) -> outs

backend(device="cpu") says whether the compiled kernels ("compiled") or the twins in
nrcore.ops.reference ("reference") serve a device. Every op is registered as a torch custom op
(torch.ops.nrcore.*) with a fake kernel, so it works under torch.compile. CPU ops raise
ValueError/TypeError naming the argument for bad input; CUDA ops never synchronise, and report
bad data through check_errors().
"""

from nrcore.ops._backend import OpError, backend, check_errors
from nrcore.ops._types import FBRStats
from nrcore.ops.barrier import barrier_coefficient, barrier_combine_, barrier_stats
from nrcore.ops.fbr import centered_gram, fbr_direction, fbr_prepare, fbr_update_
from nrcore.ops.recorder import PerSampleGradRecorder
from nrcore.ops.tangent import conv_tangent_dot, conv_tangent_kernel, tangent_dot, tangent_kernel

__all__ = [
    "FBRStats",
    "OpError",
    "PerSampleGradRecorder",
    "backend",
    "barrier_coefficient",
    "barrier_combine_",
    "barrier_stats",
    "centered_gram",
    "check_errors",
    "conv_tangent_dot",
    "conv_tangent_kernel",
    "fbr_direction",
    "fbr_prepare",
    "fbr_update_",
    "tangent_dot",
    "tangent_kernel",
]
