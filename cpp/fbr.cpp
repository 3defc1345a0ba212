// Feature-based reweighting (FBR, Algorithm 1) on the CPU, in the closed form of
// docs/method-contract.md (FBR 2): per batch one [B, d] x [d, C(+1)] contraction and an O(B*C) epilogue
// instead of the explicit [B, m] centred Gram matrix.
#include <cmath>
#include <cstring>

#include "nrcore/fbr_formula.h"
#include "gemm.h"
#include "nrcore/kernels.h"

namespace nrcore {
namespace NRCORE_ISA {
namespace {

template <class T>
int prepare(const FbrPrepareArgs& a) {
  const T* feats = static_cast<const T*>(a.feats);
  const int64_t m = a.m, d = a.d, C = a.num_classes;
  for (int64_t j = 0; j < m; ++j) {
    int64_t y = a.labels[j * a.labels_s];
    if (y < 0 || y >= C) return kBadLabel;
  }
  // Sums in double: rows [0, C) per class, row C over all clean rows.
  Scratch sums_buf(sizeof(double) * (C + 1) * d);
  double* sums = sums_buf.as<double>();
  std::memset(sums, 0, sizeof(double) * (C + 1) * d);
  for (int64_t c = 0; c < C; ++c) a.counts[c] = 0;
  for (int64_t j = 0; j < m; ++j) {
    int64_t y = a.labels[j * a.labels_s];
    a.counts[y] += 1;
    double* row = sums + y * d;
    const T* src = feats + j * a.feats_rs;
    for (int64_t k = 0; k < d; ++k) row[k] += static_cast<double>(src[k * a.feats_cs]);
  }
  double* total = sums + C * d;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < d; ++k) total[k] += sums[c * d + k];

  T* mean = static_cast<T*>(a.mean);
  T* basis_t = static_cast<T*>(a.basis_t);
  const int64_t ld = C + 1;
  Scratch mu_buf(sizeof(double) * d);
  double* mu = mu_buf.as<double>();
  for (int64_t k = 0; k < d; ++k) {
    mu[k] = a.center ? total[k] / static_cast<double>(m) : 0.0;
    mean[k] = static_cast<T>(mu[k]);
  }
  for (int64_t c = 0; c < C; ++c) {
    double n = static_cast<double>(a.counts[c]);
    for (int64_t k = 0; k < d; ++k)
      basis_t[k * ld + c] = n > 0 ? static_cast<T>(sums[c * d + k] / n - mu[k]) : T(0);
  }
  // Sum of the centred clean features: exactly zero when centring on the clean mean.
  for (int64_t k = 0; k < d; ++k) basis_t[k * ld + C] = a.center ? T(0) : static_cast<T>(total[k]);

  double sq = 0.0;
  for (int64_t j = 0; j < m; ++j) {
    const T* src = feats + j * a.feats_rs;
    for (int64_t k = 0; k < d; ++k) {
      double v = static_cast<double>(src[k * a.feats_cs]) - mu[k];
      sq += v * v;
    }
  }
  *a.sq_norm_mean = sq / static_cast<double>(m);
  if (!std::isfinite(sq)) return kNonFinite;
  return kOk;
}

template <class T>
int direction(const FbrDirectionArgs& a) {
  const int64_t B = a.batch, d = a.d, C = a.num_classes;
  const int64_t cols = a.use_total ? C + 1 : C;
  // scores[i, c] = (phi_i - mean) . M_c ; column C (if used) = (phi_i - mean) . sum_j (phi_j - mean)
  Scratch scores_buf(sizeof(T) * B * cols);
  T* scores = scores_buf.as<T>();
  View<T> A{static_cast<const T*>(a.feats), a.feats_rs, a.feats_cs};
  View<T> Bt{static_cast<const T*>(a.basis_t), C + 1, 1};  // [d, C+1] row-major
  gemm<T>(B, cols, d, A, static_cast<const T*>(a.mean), Bt, nullptr, scores, cols, false, a.nthreads);

  double m = 0.0;
  for (int64_t c = 0; c < C; ++c) m += static_cast<double>(a.counts[c]);
  T* out = static_cast<T*>(a.out);
  int status = kOk;
  for (int64_t i = 0; i < B; ++i) {
    const T* s = scores + i * cols;
    int64_t y = a.labels[i * a.labels_s];
    if (y < 0 || y >= C) {
      status |= kBadLabel;
      out[i] = T(0);
      continue;
    }
    double total = a.use_total ? static_cast<double>(s[C]) : 0.0;
    double dir = fbr_closed_form(s, a.counts, C, y, total, m, a.row_shift, a.label_sign, a.lambda_pos, a.lambda_neg);
    dir *= a.scale;
    out[i] = static_cast<T>(dir);
    if (!std::isfinite(out[i])) status |= kNonFinite;
  }
  return status;
}

template <class T>
int update(const FbrUpdateArgs& a) {
  T* w = static_cast<T*>(a.weights);
  const T* dir = static_cast<const T*>(a.direction);
  // Validate everything before touching the weights: a failed call leaves them unchanged.
  Scratch seen_buf((a.n + 7) / 8);
  unsigned char* seen = seen_buf.as<unsigned char>();
  std::memset(seen, 0, (a.n + 7) / 8);
  int status = kOk;
  for (int64_t i = 0; i < a.batch; ++i) {
    int64_t j = a.index[i * a.index_s];
    if (j < 0 || j >= a.n) {
      status |= kBadLabel;
      continue;
    }
    unsigned char bit = static_cast<unsigned char>(1u << (j & 7));
    if (seen[j >> 3] & bit) status |= kDuplicateIndex;
    seen[j >> 3] |= bit;
    if (!std::isfinite(static_cast<double>(dir[i * a.direction_s]))) status |= kNonFinite;
  }
  if (!std::isfinite(a.step_size)) status |= kNonFinite;
  if (status != kOk) return status;
  const T step = static_cast<T>(a.step_size);
  for (int64_t i = 0; i < a.batch; ++i) {
    T& wi = w[a.index[i * a.index_s] * a.weights_s];
    T v = wi + step * dir[i * a.direction_s];
    wi = v < T(0) ? T(0) : (v > T(1) ? T(1) : v);
  }
  return kOk;
}

}  // namespace

int fbr_prepare(const FbrPrepareArgs& a) { return a.dtype == kFloat64 ? prepare<double>(a) : prepare<float>(a); }
int fbr_direction(const FbrDirectionArgs& a) {
  return a.dtype == kFloat64 ? direction<double>(a) : direction<float>(a);
}
int fbr_update(const FbrUpdateArgs& a) { return a.dtype == kFloat64 ? update<double>(a) : update<float>(a); }

}  // namespace NRCORE_ISA
}  // namespace nrcore
