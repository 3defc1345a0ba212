// Barrier reductions for MLC-D / EBOMLC on the CPU: one pass over whole lists of gradient
// tensors. Each thread takes an equal share of the concatenated elements, whatever the tensor
// boundaries, so a list of many small tensors costs no more than one big tensor.
#include <cmath>
#include <cstring>
#include <type_traits>

#include "gemm.h"
#include "nrcore/kernels.h"

namespace nrcore {
namespace NRCORE_ISA {
namespace {

constexpr int64_t kMinElemsPerThread = int64_t(1) << 18;
constexpr int kLanes = 8;
typedef double d8 __attribute__((vector_size(8 * sizeof(double))));
typedef float f8 __attribute__((vector_size(8 * sizeof(float))));

inline d8 load8(const double* p) {
  d8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline d8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(v, d8);
}
inline double hsum(d8 v) {
  double s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// Sums of x*y (and y*y) over [0, n) in double. Products of float inputs are exact in double, so
// plain double sums (four independent accumulators per lane, to keep the adders busy) suffice;
// float64 inputs get Kahan compensation per lane instead.
template <class T, bool kSquare>
void accumulate(const T* x, const T* y, int64_t n, double& sum_xy, double& sum_yy) {
  int64_t i = 0;
  double xy = 0.0, yy = 0.0;
  if constexpr (std::is_same<T, float>::value) {
    d8 s_xy[4] = {}, s_yy[4] = {};
    for (; i + 4 * kLanes <= n; i += 4 * kLanes)
      for (int u = 0; u < 4; ++u) {
        d8 yv = load8(y + i + u * kLanes);
        d8 xv = kSquare ? yv : load8(x + i + u * kLanes);
        s_xy[u] += xv * yv;
        if (!kSquare) s_yy[u] += yv * yv;
      }
    xy = hsum(s_xy[0] + s_xy[1] + s_xy[2] + s_xy[3]);
    yy = hsum(s_yy[0] + s_yy[1] + s_yy[2] + s_yy[3]);
  } else {
    d8 s_xy{}, c_xy{}, s_yy{}, c_yy{};
    for (; i + kLanes <= n; i += kLanes) {
      d8 yv = load8(y + i);
      d8 xv = kSquare ? yv : load8(x + i);
      d8 t, v;
      v = xv * yv - c_xy;
      t = s_xy + v;
      c_xy = (t - s_xy) - v;
      s_xy = t;
      if (!kSquare) {
        v = yv * yv - c_yy;
        t = s_yy + v;
        c_yy = (t - s_yy) - v;
        s_yy = t;
      }
    }
    xy = hsum(s_xy) - hsum(c_xy);
    yy = hsum(s_yy) - hsum(c_yy);
  }
  for (; i < n; ++i) {
    double yi = static_cast<double>(y[i]);
    xy += (kSquare ? yi : static_cast<double>(x[i])) * yi;
    if (!kSquare) yy += yi * yi;
  }
  sum_xy += xy;
  sum_yy += yy;
}

// Visit [begin, end) of the concatenation of tensors with sizes numel[0..num): fn(i, off, len).
template <class Fn>
void for_each_span(const int64_t* numel, int64_t num, int64_t begin, int64_t end, Fn&& fn) {
  int64_t base = 0;
  for (int64_t i = 0; i < num && base < end; base += numel[i], ++i) {
    int64_t lo = begin > base ? begin - base : 0;
    int64_t hi = end - base < numel[i] ? end - base : numel[i];
    if (lo < hi) fn(i, lo, hi - lo);
  }
}

template <class P, class A>
void stats_impl(const BarrierStatsArgs& a, double* partial, int64_t lo, int64_t hi, int64_t pair_total) {
  double dot = 0, sq_w = 0, sq_alpha = 0, unused = 0;
  if (lo < pair_total)
    for_each_span(a.pair_numel, a.num_pairs, lo, hi < pair_total ? hi : pair_total, [&](int64_t i, int64_t off, int64_t len) {
      accumulate<P, false>(static_cast<const P*>(a.f[i]) + off, static_cast<const P*>(a.q[i]) + off, len, dot, sq_w);
    });
  if (hi > pair_total)
    for_each_span(a.alpha_numel, a.num_alpha, (lo > pair_total ? lo : pair_total) - pair_total, hi - pair_total,
                  [&](int64_t i, int64_t off, int64_t len) {
                    const A* x = static_cast<const A*>(a.alpha[i]) + off;
                    accumulate<A, true>(x, x, len, sq_alpha, unused);
                  });
  partial[0] = dot;
  partial[1] = sq_w;
  partial[2] = sq_alpha;
}

template <class T>
void combine_impl(const BarrierCombineArgs& a, int64_t lo, int64_t hi, double* bad) {
  typedef T V __attribute__((vector_size(kVecBytes)));
  constexpr int L = kVecBytes / sizeof(T);
  const T c = static_cast<T>(a.coef);
  // (x - x) is 0 for finite x and NaN otherwise: a branch-free, vectorisable finiteness check.
  V check{};
  T check_tail = 0;
  for_each_span(a.numel, a.num, lo, hi, [&](int64_t t, int64_t off, int64_t len) {
    T* out = static_cast<T*>(a.outs[t]) + off;
    const T* f = a.f ? static_cast<const T*>(a.f[t]) + off : nullptr;
    const T* q = static_cast<const T*>(a.q[t]) + off;
    int64_t i = 0;
    for (; i + L <= len; i += L) {
      V qv, fv{}, ov;
      std::memcpy(&qv, q + i, sizeof(V));
      if (f) std::memcpy(&fv, f + i, sizeof(V));
      ov = fv + c * qv;
      std::memcpy(out + i, &ov, sizeof(V));
      check += ov - ov;
    }
    for (; i < len; ++i) {
      T o = (f ? f[i] : T(0)) + c * q[i];
      out[i] = o;
      check_tail += o - o;
    }
  });
  T total = check_tail;
  for (int i = 0; i < L; ++i) total += check[i];
  *bad = total == T(0) ? 0.0 : 1.0;
}

int64_t total_of(const int64_t* numel, int64_t n) {
  int64_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += numel[i];
  return s;
}

int64_t num_chunks(int64_t total, int nthreads) {
  int64_t chunks = total / kMinElemsPerThread;
  if (chunks > nthreads) chunks = nthreads;
  return chunks < 1 ? 1 : chunks;
}

// Split [0, total) into `chunks` equal ranges, one per thread: body(chunk, lo, hi).
template <class Fn>
void for_each_chunk(int64_t total, int64_t chunks, Fn&& body) {
  int64_t step = (total + chunks - 1) / chunks;
  parallel_for(chunks, static_cast<int>(chunks), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t lo = c * step < total ? c * step : total, hi = lo + step < total ? lo + step : total;
      body(c, lo, hi);
    }
  });
}

template <class P, class A>
int stats_typed(const BarrierStatsArgs& a) {
  int64_t pair_total = total_of(a.pair_numel, a.num_pairs);
  int64_t total = pair_total + total_of(a.alpha_numel, a.num_alpha);
  int64_t chunks = num_chunks(total, a.nthreads);
  Scratch partial_buf(sizeof(double) * 3 * chunks);
  double* partials = partial_buf.as<double>();
  for_each_chunk(total, chunks, [&](int64_t c, int64_t lo, int64_t hi) {
    stats_impl<P, A>(a, partials + 3 * c, lo, hi, pair_total);
  });
  double sums[3] = {0, 0, 0};
  for (int64_t c = 0; c < chunks; ++c)
    for (int j = 0; j < 3; ++j) sums[j] += partials[c * 3 + j];
  bool finite = std::isfinite(sums[0]) && std::isfinite(sums[1]) && std::isfinite(sums[2]);
  for (int j = 0; j < 3; ++j) a.out[j] = sums[j];
  a.out[3] = finite ? 0.0 : 1.0;
  return kOk;
}

template <class T>
int combine_typed(const BarrierCombineArgs& a) {
  if (a.skip && *a.skip != 0.0) return kOk;  // a step the caller skips: leave outs as they are
  int64_t total = total_of(a.numel, a.num);
  int64_t chunks = num_chunks(total, a.nthreads);
  Scratch bad_buf(sizeof(double) * chunks);
  double* bad = bad_buf.as<double>();
  for_each_chunk(total, chunks, [&](int64_t c, int64_t lo, int64_t hi) { combine_impl<T>(a, lo, hi, bad + c); });
  for (int64_t c = 0; c < chunks; ++c)
    if (bad[c] != 0.0) return kNonFinite;
  return kOk;
}

}  // namespace

int barrier_stats(const BarrierStatsArgs& a) {
  bool p64 = a.pair_dtype == kFloat64, a64 = a.alpha_dtype == kFloat64;
  if (p64) return a64 ? stats_typed<double, double>(a) : stats_typed<double, float>(a);
  return a64 ? stats_typed<float, double>(a) : stats_typed<float, float>(a);
}

int barrier_combine(const BarrierCombineArgs& a) {
  return a.dtype == kFloat64 ? combine_typed<double>(a) : combine_typed<float>(a);
}

}  // namespace NRCORE_ISA
}  // namespace nrcore
