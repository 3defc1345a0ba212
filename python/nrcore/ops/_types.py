"""Value types shared by the compiled ops and their reference twins."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FBRStats:
    """Clean-set statistics for the FBR closed form, computed once per epoch by `fbr_prepare`.

    mean:         [d]      clean mean mu (zeros when prepared with center=False)
    basis_t:      [d, C+1] columns 0..C-1: centred class means M_c = mean_{j: y_j = c} (phi_j - mu)
                           (zeros for classes absent from the clean set); column C: the sum
                           sum_j (phi_j - mu) (exactly zero when centred). Stored transposed so the
                           per-batch contraction reads it row by row.
    counts:       [C]      clean examples per class n_c (int64)
    num_classes:  C;  num_clean: m;  num_present: classes with n_c > 0
    sq_norm_mean: mean_j |phi_j - mu|^2 (the normalize=True scale is 1 / (m * sq_norm_mean))
    center:       whether mu is the clean mean
    """

    mean: torch.Tensor
    basis_t: torch.Tensor
    counts: torch.Tensor
    num_classes: int
    num_clean: int
    num_present: int
    sq_norm_mean: float
    center: bool

    @property
    def class_means(self) -> torch.Tensor:
        """[C, d] centred class means (a view of basis_t)."""
        return self.basis_t[:, : self.num_classes].t()

    @property
    def feature_dim(self) -> int:
        return self.basis_t.shape[0]

    def to(self, device) -> "FBRStats":
        return FBRStats(
            self.mean.to(device), self.basis_t.to(device), self.counts.to(device), self.num_classes,
            self.num_clean, self.num_present, self.sq_norm_mean, self.center,
        )
