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
#include "nrcore/kernels.h"

namespace nrcore {
namespace NRCORE_ISA {
namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Elements of explicit per-example gradients held at once. A kernel keeps side a whole when it
// fits (32 MiB in float32; else it is chunked and side b formed once per chunk) and streams side
// b through in small chunks (4 MiB), each formed once; a dot needs only small chunks.
constexpr int64_t kExplicitResidentBudget = int64_t(8) << 20;
constexpr int64_t kExplicitChunkBudget = int64_t(1) << 20;
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

// G_b = sum_t g_b[t] a_b[t]^T ([q, p]) for examples [b0, b1) into dst[(b - b0) * q * p ...].
template <class T>
struct StridedGrads {
  const Side<T>& s;
  int64_t p, q;
  void operator()(int64_t b0, int64_t b1, T* dst, int nthreads) const {
    parallel_for(b1 - b0, nthreads, grain(double(s.T_) * p * q), [&](int64_t lo, int64_t hi) {
      Scratch scratch(sizeof(T) * gemm_scratch_elems<T>(q, p, s.T_));
      for (int64_t b = b0 + lo; b < b0 + hi; ++b) {
        View<T> gt{s.grads + b * s.g_sb, s.g_sq, s.g_st};  // (q, t)
        View<T> a{s.acts + b * s.a_sb, s.a_st, s.a_sp};    // (t, p)
        gemm_serial<T>(q, p, s.T_, gt, nullptr, a, nullptr, dst + (b - b0) * q * p, p, false, scratch.as<T>());
      }
    });
  }
};

// Conv2d: G_b^T = patches_b^T grads_b ([p, q]) without im2col. With the example's image
// zero-padded into a small buffer xp [C, Hp, Wp], patch element (pp = (c, ki, kj), t = (ho, wo))
// is xp[row_off[pp] + k_off[t]], which the GEMM micro-kernel reads in place.
template <class T>
struct ConvGrads {
  const ConvGeometry& g;
  const T* x;
  const T* grads;
  int64_t g_sb, g_sq, g_st, q;
  void operator()(int64_t b0, int64_t b1, T* dst, int nthreads) const {
    const int64_t L = g.out_h * g.out_w, p = g.channels * g.kh * g.kw;
    const int64_t Hp = g.height + 2 * g.pad_h, Wp = g.width + 2 * g.pad_w, plane = Hp * Wp;
    Scratch offsets(sizeof(int64_t) * (p + L));
    int64_t* row_off = offsets.as<int64_t>();
    int64_t* k_off = row_off + p;
    for (int64_t c = 0; c < g.channels; ++c)
      for (int64_t i = 0; i < g.kh; ++i)
        for (int64_t j = 0; j < g.kw; ++j) row_off[(c * g.kh + i) * g.kw + j] = c * plane + i * g.dil_h * Wp + j * g.dil_w;
    for (int64_t ho = 0; ho < g.out_h; ++ho)
      for (int64_t wo = 0; wo < g.out_w; ++wo) k_off[ho * g.out_w + wo] = ho * g.stride_h * Wp + wo * g.stride_w;
    parallel_for(b1 - b0, nthreads, grain(double(L) * p * q), [&](int64_t lo, int64_t hi) {
      Scratch padded(sizeof(T) * g.channels * plane);
      Scratch scratch(sizeof(T) * gemm_scratch_elems<T>(p, q, L));
      T* xp = padded.as<T>();
      std::memset(xp, 0, sizeof(T) * g.channels * plane);  // the border stays zero
      for (int64_t b = b0 + lo; b < b0 + hi; ++b) {
        const T* xb = x + b * g.sb;
        for (int64_t c = 0; c < g.channels; ++c)
          for (int64_t h = 0; h < g.height; ++h) {
            T* row = xp + c * plane + (h + g.pad_h) * Wp + g.pad_w;
            const T* src = xb + c * g.sc + h * g.sh;
            for (int64_t w = 0; w < g.width; ++w) row[w] = src[w * g.sw];
          }
        View<T> gr{grads + b * g_sb, g_st, g_sq};  // (t, q)
        gemm_gather_a<T>(p, q, L, xp, row_off, k_off, gr, dst + (b - b0) * p * q, q, scratch.as<T>());
      }
    });
  }
};

// out[b, kk] = <G_b, D_kk>: per-example gradients formed a chunk at a time (G and D flattened
// the same way, gsize elements each).
template <class T, class Former>
void explicit_dot(const Former& form, int64_t B, int64_t gsize, const T* D, int64_t k, T* out, int nthreads) {
  int64_t chunk = max64(1, kExplicitChunkBudget / max64(1, gsize));
  Scratch g_buf(sizeof(T) * min64(chunk, B) * gsize);
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    int64_t b1 = min64(B, b0 + chunk);
    form(b0, b1, g_buf.as<T>(), nthreads);
    gemm_rows<T>(b1 - b0, k, gsize, g_buf.as<T>(), gsize, D, gsize, out + b0 * k, k, false, nthreads);
  }
}

// out[i, j] = <G_i, G'_j>: side a in as few chunks as the resident budget allows, side b in
// small chunks against each (formed once in all when side a fits).
template <class T, class FormerA, class FormerB>
void explicit_kernel(const FormerA& form_a, int64_t B, const FormerB& form_b, int64_t M, int64_t gsize, T* out,
                     int nthreads) {
  const int64_t ca = min64(B, max64(1, kExplicitResidentBudget / max64(1, gsize)));
  const int64_t cb = min64(M, max64(1, kExplicitChunkBudget / max64(1, gsize)));
  Scratch ga_buf(sizeof(T) * ca * gsize), gb_buf(sizeof(T) * cb * gsize);
  for (int64_t a0 = 0; a0 < B; a0 += ca) {
    int64_t a1 = min64(B, a0 + ca);
    form_a(a0, a1, ga_buf.as<T>(), nthreads);
    for (int64_t m0 = 0; m0 < M; m0 += cb) {
      int64_t m1 = min64(M, m0 + cb);
      form_b(m0, m1, gb_buf.as<T>(), nthreads);
      gemm_rows<T>(a1 - a0, m1 - m0, gsize, ga_buf.as<T>(), gsize, gb_buf.as<T>(), gsize, out + a0 * M + m0, M, false,
                   nthreads);
    }
  }
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
    explicit_dot<T>(StridedGrads<T>{s, p, q}, B, qp, D, k, out, a.nthreads);
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
    explicit_kernel<T>(StridedGrads<T>{sa, p, q}, B, StridedGrads<T>{sb, p, q}, M, qp, out, a.nthreads);
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

template <class T>
int conv_dot_impl(const ConvTangentDotArgs& a) {
  const ConvGeometry& g = a.geom;
  const int64_t p = g.channels * g.kh * g.kw;
  ConvGrads<T> form{g, static_cast<const T*>(a.x), static_cast<const T*>(a.grads), a.grads_sb, a.grads_sq, a.grads_st, a.q};
  T* out = static_cast<T*>(a.out);
  explicit_dot<T>(form, a.batch, p * a.q, static_cast<const T*>(a.direction_t), a.k, out, a.nthreads);
  return check_finite(out, a.batch * a.k);
}

template <class T>
int conv_kernel_impl(const ConvTangentKernelArgs& a) {
  const int64_t p = a.geom_a.channels * a.geom_a.kh * a.geom_a.kw;
  ConvGrads<T> form_a{a.geom_a, static_cast<const T*>(a.x_a), static_cast<const T*>(a.grads_a), a.grads_a_sb,
                      a.grads_a_sq, a.grads_a_st, a.q};
  ConvGrads<T> form_b{a.geom_b, static_cast<const T*>(a.x_b), static_cast<const T*>(a.grads_b), a.grads_b_sb,
                      a.grads_b_sq, a.grads_b_st, a.q};
  T* out = static_cast<T*>(a.out);
  explicit_kernel<T>(form_a, a.batch_a, form_b, a.batch_b, p * a.q, out, a.nthreads);
  return check_finite(out, a.batch_a * a.batch_b);
}

}  // namespace

int conv_tangent_dot(const ConvTangentDotArgs& a) {
  return a.dtype == kFloat64 ? conv_dot_impl<double>(a) : conv_dot_impl<float>(a);
}
int conv_tangent_kernel(const ConvTangentKernelArgs& a) {
  return a.dtype == kFloat64 ? conv_kernel_impl<double>(a) : conv_kernel_impl<float>(a);
}

int tangent_dot(const TangentDotArgs& a) { return a.dtype == kFloat64 ? dot_impl<double>(a) : dot_impl<float>(a); }
int tangent_kernel(const TangentKernelArgs& a) {
  return a.dtype == kFloat64 ? kernel_impl<double>(a) : kernel_impl<float>(a);
}

}  // namespace NRCORE_ISA
}  // namespace nrcore
