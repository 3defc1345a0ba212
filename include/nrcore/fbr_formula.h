// The FBR closed form for one row, shared by the CPU and CUDA kernels (docs/method-contract.md, FBR 2).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace nrcore {

// scores[c] = (phi_i - mu) . M_c for c < C; total = (phi_i - mu) . sum_j (phi_j - mu);
// m = sum_c counts[c]; y the example's label (in range). Returns d_i (before any scale).
// A NaN score makes the result NaN, so callers' non-finite checks see it. `static`: the per-ISA
// CPU objects must each keep their own copy (see common.h on merged template copies).
template <class S>
NRCORE_HOST_DEVICE static inline double fbr_closed_form(const S* scores, const int64_t* counts, int64_t C, int64_t y,
                                                 double total, double m, bool row_shift, bool label_sign,
                                                 double lambda_pos, double lambda_neg) {
  double shift = 0.0;
  if (row_shift) {
    // Second largest class mean among classes present in the clean set (ties count twice).
    const double neg_inf = -static_cast<double>(INFINITY);
    double top1 = neg_inf, top2 = neg_inf;
    bool nan_seen = false;
    for (int64_t c = 0; c < C; ++c) {
      if (counts[c] <= 0) continue;
      double v = static_cast<double>(scores[c]);
      nan_seen |= v != v;
      if (v > top1) {
        top2 = top1;
        top1 = v;
      } else if (v > top2) {
        top2 = v;
      }
    }
    shift = nan_seen ? static_cast<double>(NAN) : (top2 > neg_inf ? top2 : 0.0);
  }
  if (!label_sign) return lambda_pos * (total - m * shift);
  double ny = static_cast<double>(counts[y]);
  double sy = static_cast<double>(scores[y]);
  return lambda_pos * ny * (sy - shift) - lambda_neg * ((total - ny * sy) - (m - ny) * shift);
}

}  // namespace nrcore
