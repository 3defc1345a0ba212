// Per-sample Jacobian-kernel products on the CPU. For one linear map with per-example inputs
// a_i[t] (p) and output gradients g_i[t] (q), example i's weight gradient is
// G_i = sum_t g_i[t] a_i[t]^T  (q x p). Two ways to contract:
//   ghost:    never form G_i;  <G_i, D> = sum_t g_i[t]^T D a_i[t],
//             <G_i, G'_j> = sum_{t,s} (a_i[t].a'_j[s]) (g_i[t].g'_j[s])
//   explicit: form G_i for a chunk of examples, then one GEMM against D or G'.
// The cheaper one (by multiply-add count) is picked per call, as in the ghost-clipping and
// per-sample-gradient literature; chunking bounds the memory of the explicit form.
#include <cmath>
#include <cstring>

#include "gemm.h"
#include "kernels.h"

namespace nrcore {
namespace NRCORE_ISA {
namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Elements of one side's explicit per-example gradients held at once (16 MiB in float32).
constexpr int64_t kExplicitBudget = int64_t(4) << 20;
// Rows of a ghost block (examples x positions) per GEMM.
constexpr int64_t kGhostRows = 256;
// Multiply-adds below which a second thread costs more than it saves.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 20;

// Items per thread so that each thread gets at least kMinWorkPerThread multiply-adds.
inline int64_t grain(double work_per_item) {
  return work_per_item >= kMinWorkPerThread ? 1 : int64_t(kMinWorkPerThread / (work_per_item + 1.0)) + 1;
}

// One side of a contraction: x[b, t, j] = p[b * sb + t * st + j * sj] for x in {acts, grads}.
template <class T>
struct Side {
  const T* acts;
  int64_t a_sb, a_st, a_sp;
  const T* grads;
  int64_t g_sb, g_st, g_sq;
  int64_t n, T_;  // examples, positions

  // Rows (b, t) of examples [b0, b1) as one strided matrix, possible when example rows are
  // evenly spaced (always for a single example).
  bool flat() const { return T_ == 1 || (a_sb == T_ * a_st && g_sb == T_ * g_st); }
  View<T> act_rows(int64_t b0) const { return {acts + b0 * a_sb, T_ == 1 ? a_sb : a_st, a_sp}; }
  View<T> grad_rows(int64_t b0) const { return {grads + b0 * g_sb, T_ == 1 ? g_sb : g_st, g_sq}; }
  // Examples per ghost block: as many as fit kGhostRows rows, or one if rows are not flat.
  int64_t block(int64_t limit_rows) const { return T_ > 0 && flat() ? max64(1, limit_rows / T_) : 1; }
};

// G_b = sum_t g_b[t] a_b[t]^T for examples [b0, b1) into dst[(b - b0) * q * p ...].
template <class T>
void explicit_grads(const Side<T>& s, int64_t b0, int64_t b1, int64_t p, int64_t q, T* dst, int nthreads) {
  parallel_for(b1 - b0, nthreads, grain(double(s.T_) * p * q), [&](int64_t lo, int64_t hi) {
    Scratch scratch(sizeof(T) * gemm_scratch_elems<T>(q, p, s.T_));
    for (int64_t b = b0 + lo; b < b0 + hi; ++b) {
      View<T> gt{s.grads + b * s.g_sb, s.g_sq, s.g_st};  // (q, t)
      View<T> a{s.acts + b * s.a_sb, s.a_st, s.a_sp};    // (t, p)
      gemm_serial<T>(q, p, s.T_, gt, nullptr, a, nullptr, dst + (b - b0) * q * p, p, false, scratch.as<T>());
    }
  });
}

template <class T>
int check_finite(const T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(out[i])) return kNonFinite;
  return kOk;
}

template <class T>
int dot_impl(const TangentDotArgs& a) {
  const int64_t B = a.batch, Tn = a.T, p = a.p, q = a.q, k = a.k, qp = q * p;
  Side<T> s{static_cast<const T*>(a.acts), a.acts_sb, a.acts_st, a.acts_sp,
            static_cast<const T*>(a.grads), a.grads_sb, a.grads_st, a.grads_sq, B, Tn};
  const T* D = static_cast<const T*>(a.direction);
  T* out = static_cast<T*>(a.out);
  double ghost = double(k) * Tn * p * q, expl = double(Tn) * p * q + double(k) * p * q;
  bool use_ghost = a.strategy == kGhost || (a.strategy == kAuto && ghost <= expl);

  if (!use_ghost) {
    int64_t chunk = max64(1, kExplicitBudget / max64(1, qp));
    Scratch g_buf(sizeof(T) * min64(chunk, B) * qp);
    for (int64_t b0 = 0; b0 < B; b0 += chunk) {
      int64_t b1 = min64(B, b0 + chunk);
      explicit_grads<T>(s, b0, b1, p, q, g_buf.as<T>(), a.nthreads);
      View<T> G{g_buf.as<T>(), qp, 1};
      View<T> Dt{D, 1, qp};  // (x, kk) -> D[kk * qp + x]
      gemm<T>(b1 - b0, k, qp, G, nullptr, Dt, nullptr, out + b0 * k, k, false, a.nthreads);
    }
    return check_finite(out, B * k);
  }

  // Ghost: Y = a_rows D^T  ([rows, k*q]), then out[b, kk] = sum_{t, j} Y[(b,t), kk*q + j] g[(b,t), j].
  const int64_t per_block = s.block(kGhostRows);
  View<T> Dmat{D, 1, p};  // (x, (kk, j)) -> D[(kk * q + j) * p + x]
  parallel_for(B, a.nthreads, grain(double(Tn) * k * q * p), [&](int64_t lo, int64_t hi) {
    const int64_t row_step = min64(min64(per_block, hi - lo) * Tn, kGhostRows);
    Scratch y_buf(sizeof(T) * row_step * k * q);
    Scratch scratch(sizeof(T) * gemm_scratch_elems<T>(row_step, k * q, p));
    T* Y = y_buf.as<T>();
    for (int64_t b = lo; b < hi; ++b)
      for (int64_t kk = 0; kk < k; ++kk) out[b * k + kk] = T(0);
    for (int64_t b0 = lo; b0 < hi; b0 += per_block) {
      int64_t b1 = min64(hi, b0 + per_block);
      int64_t rows = (b1 - b0) * Tn;
      View<T> arows = s.act_rows(b0), grows = s.grad_rows(b0);
      for (int64_t r0 = 0; r0 < rows; r0 += row_step) {
        int64_t nr = min64(row_step, rows - r0);
        gemm_serial<T>(nr, k * q, p, arows.shifted(r0, 0), nullptr, Dmat, nullptr, Y, k * q, false, scratch.as<T>());
        for (int64_t r = 0; r < nr; ++r) {
          int64_t b = b0 + (r0 + r) / Tn;
          const T* y = Y + r * k * q;
          for (int64_t kk = 0; kk < k; ++kk) {
            T acc = T(0);
            for (int64_t j = 0; j < q; ++j) acc += y[kk * q + j] * grows(r0 + r, j);
            out[b * k + kk] += acc;
          }
        }
      }
    }
  });
  return check_finite(out, B * k);
}

template <class T>
int kernel_impl(const TangentKernelArgs& a) {
  const int64_t B = a.batch_a, M = a.batch_b, Ta = a.T, Sb = a.S, p = a.p, q = a.q, qp = p * q;
  Side<T> sa{static_cast<const T*>(a.acts_a), a.acts_a_sb, a.acts_a_st, a.acts_a_sp,
             static_cast<const T*>(a.grads_a), a.grads_a_sb, a.grads_a_st, a.grads_a_sq, B, Ta};
  Side<T> sb{static_cast<const T*>(a.acts_b), a.acts_b_sb, a.acts_b_st, a.acts_b_sp,
             static_cast<const T*>(a.grads_b), a.grads_b_sb, a.grads_b_st, a.grads_b_sq, M, Sb};
  T* out = static_cast<T*>(a.out);
  double ghost = double(B) * M * Ta * Sb * (p + q);
  double expl = (double(B) * Ta + double(M) * Sb) * qp + double(B) * M * qp;
  bool use_ghost = a.strategy == kGhost || (a.strategy == kAuto && ghost <= expl);

  if (!use_ghost) {
    int64_t chunk = max64(1, kExplicitBudget / max64(1, qp));
    int64_t ca = min64(chunk, B), cb = min64(chunk, M);
    Scratch ga_buf(sizeof(T) * ca * qp), gb_buf(sizeof(T) * cb * qp);
    bool b_resident = cb == M;  // all of side b fits: form it once
    if (b_resident) explicit_grads<T>(sb, 0, M, p, q, gb_buf.as<T>(), a.nthreads);
    for (int64_t a0 = 0; a0 < B; a0 += ca) {
      int64_t a1 = min64(B, a0 + ca);
      explicit_grads<T>(sa, a0, a1, p, q, ga_buf.as<T>(), a.nthreads);
      for (int64_t m0 = 0; m0 < M; m0 += cb) {
        int64_t m1 = min64(M, m0 + cb);
        if (!b_resident) explicit_grads<T>(sb, m0, m1, p, q, gb_buf.as<T>(), a.nthreads);
        View<T> Ga{ga_buf.as<T>(), qp, 1};
        View<T> Gbt{gb_buf.as<T>(), 1, qp};  // (x, j) -> Gb[j * qp + x]
        // out[a0:a1, m0:m1] (row stride M)
        gemm<T>(a1 - a0, m1 - m0, qp, Ga, nullptr, Gbt, nullptr, out + a0 * M + m0, M, false, a.nthreads);
      }
    }
    return check_finite(out, B * M);
  }

  // Ghost: for blocks of examples, AA = a-rows x b-rows^T and GG likewise, then
  // out[i, j] = sum over the (t, s) sub-block of AA * GG.
  const int64_t pa = sa.block(kGhostRows), pb = sb.block(2 * kGhostRows);
  parallel_for(B, a.nthreads, grain(double(M) * Ta * Sb * (p + q)), [&](int64_t lo, int64_t hi) {
    const int64_t ra = min64(pa, hi - lo) * Ta, rb = min64(pb, M) * Sb;
    Scratch aa_buf(sizeof(T) * ra * rb), gg_buf(sizeof(T) * ra * rb);
    Scratch scratch(sizeof(T) * max64(gemm_scratch_elems<T>(ra, rb, p), gemm_scratch_elems<T>(ra, rb, q)));
    T* AA = aa_buf.as<T>();
    T* GG = gg_buf.as<T>();
    for (int64_t a0 = lo; a0 < hi; a0 += pa) {
      int64_t a1 = min64(hi, a0 + pa), na = (a1 - a0) * Ta;
      for (int64_t m0 = 0; m0 < M; m0 += pb) {
        int64_t m1 = min64(M, m0 + pb), nb = (m1 - m0) * Sb;
        gemm_serial<T>(na, nb, p, sa.act_rows(a0), nullptr, sb.act_rows(m0).transposed(), nullptr, AA, nb, false,
                       scratch.as<T>());
        gemm_serial<T>(na, nb, q, sa.grad_rows(a0), nullptr, sb.grad_rows(m0).transposed(), nullptr, GG, nb, false,
                       scratch.as<T>());
        for (int64_t i = a0; i < a1; ++i)
          for (int64_t j = m0; j < m1; ++j) {
            T acc = T(0);
            for (int64_t t = 0; t < Ta; ++t) {
              const T* aa = AA + ((i - a0) * Ta + t) * nb + (j - m0) * Sb;
              const T* gg = GG + ((i - a0) * Ta + t) * nb + (j - m0) * Sb;
              for (int64_t s = 0; s < Sb; ++s) acc += aa[s] * gg[s];
            }
            out[i * M + j] = acc;
          }
      }
    }
  });
  return check_finite(out, B * M);
}

}  // namespace

int tangent_dot(const TangentDotArgs& a) { return a.dtype == kFloat64 ? dot_impl<double>(a) : dot_impl<float>(a); }
int tangent_kernel(const TangentKernelArgs& a) {
  return a.dtype == kFloat64 ? kernel_impl<double>(a) : kernel_impl<float>(a);
}

}  // namespace NRCORE_ISA
}  // namespace nrcore
