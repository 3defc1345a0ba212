// Per-sample Jacobian-kernel products on CUDA: ghost or explicit contraction picked by the same
// multiply-add count as the CPU kernels (cpp/tangent.cpp), on the batched tiled GEMM.
#include "common.cuh"
#include "gemm.cuh"
#include "nrcore/launch.h"

namespace nrcore {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// Elements of a scratch buffer (explicit gradients, ghost products) per chunk: 64 MiB in fp32.
constexpr int64_t kBudget = int64_t(16) << 20;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// out[b0 + b, kk] = sum_{t, j} Y[b, t, kk*q + j] * grads[b0 + b, t, j]; one block per (b, kk).
template <class T, class Acc>
__global__ void __launch_bounds__(kThreads) ghost_dot_reduce_kernel(int64_t nb, int64_t T_, int64_t q, int64_t k,
                                                                    const Acc* Y, const T* grads, int64_t gsb,
                                                                    int64_t gst, int64_t gsq, Acc* out) {
  __shared__ Acc part[kThreads];
  for (int64_t blk = blockIdx.x; blk < nb * k; blk += gridDim.x) {
    int64_t b = blk / k, kk = blk % k;
    Acc s = Acc(0);
    for (int64_t e = threadIdx.x; e < T_ * q; e += kThreads) {
      int64_t t = e / q, j = e % q;
      s += Y[(b * T_ + t) * k * q + kk * q + j] * to_acc<Acc>(grads[b * gsb + t * gst + j * gsq]);
    }
    part[threadIdx.x] = s;
    __syncthreads();
    for (int w = kThreads / 2; w > 0; w /= 2) {
      if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
      __syncthreads();
    }
    if (threadIdx.x == 0) out[b * k + kk] = part[0];
    __syncthreads();
  }
}

// out[i, j] = sum_{t, s} AA[i, t, j*S + s] * GG[i, t, j*S + s] (row stride ld of out).
template <class Acc>
__global__ void ghost_kernel_reduce_kernel(int64_t na, int64_t nb, int64_t T_, int64_t S, const Acc* AA,
                                           const Acc* GG, Acc* out, int64_t ld) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < na * nb; e += int64_t(gridDim.x) * blockDim.x) {
    int64_t i = e / nb, j = e % nb;
    Acc s = Acc(0);
    for (int64_t t = 0; t < T_; ++t) {
      const Acc* aa = AA + (i * T_ + t) * nb * S + j * S;
      const Acc* gg = GG + (i * T_ + t) * nb * S + j * S;
      for (int64_t u = 0; u < S; ++u) s += aa[u] * gg[u];
    }
    out[i * ld + j] = s;
  }
}

// dst[b, t, w] (contiguous) = src[b * sb + t * st + w * sw].
template <class T>
__global__ void copy3d_kernel(int64_t n, int64_t R, int64_t W, const T* src, int64_t sb, int64_t st, int64_t sw, T* dst) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n * R * W; e += int64_t(gridDim.x) * blockDim.x) {
    int64_t w = e % W, t = (e / W) % R, b = e / (W * R);
    dst[e] = src[b * sb + t * st + w * sw];
  }
}

inline bool rows_flat(int64_t R, int64_t sb, int64_t st) { return R == 1 || sb == R * st; }

// One side's rows (b, t) as a single strided 2-D operand (k index = feature), copying into
// `scratch` (sized by the caller when !rows_flat) when the examples' rows are not evenly spaced.
template <class T, class Acc>
Operand<T, Acc> rows_operand(const T* p, int64_t n, int64_t R, int64_t W, int64_t sb, int64_t st, int64_t sw,
                             Workspace& scratch, cudaStream_t stream) {
  if (R == 1) return {p, sb, sw, 0, nullptr};
  if (sb == R * st) return {p, st, sw, 0, nullptr};
  copy3d_kernel<T><<<grid_for(n * R * W, kThreads, 4096), kThreads, 0, stream>>>(n, R, W, p, sb, st, sw, scratch.as<T>());
  check_launch("tangent/copy");
  return {scratch.as<T>(), W, 1, 0, nullptr};
}

template <class T>
void dot_impl(const TangentDotArgs& a, cudaStream_t stream, unsigned int* err) {
  using Acc = typename AccOf<T>::type;
  const int64_t B = a.batch, Tn = a.T, p = a.p, q = a.q, k = a.k, qp = q * p;
  const T* acts = static_cast<const T*>(a.acts);
  const T* grads = static_cast<const T*>(a.grads);
  const T* D = static_cast<const T*>(a.direction);
  Acc* out = static_cast<Acc*>(a.out);
  double ghost = double(k) * Tn * p * q, expl = double(Tn) * p * q + double(k) * p * q;
  bool use_ghost = a.strategy == kGhost || (a.strategy == kAuto && ghost <= expl);
  if (!use_ghost) {
    int64_t chunk = min64(B, max64(1, kBudget / max64(1, qp)));
    Workspace G(sizeof(Acc) * chunk * qp, stream);
    for (int64_t b0 = 0; b0 < B; b0 += chunk) {
      int64_t nb = min64(chunk, B - b0);
      Operand<T, Acc> gt{grads + b0 * a.grads_sb, a.grads_sq, a.grads_st, a.grads_sb, nullptr};  // (q, t)
      Operand<T, Acc> ac{acts + b0 * a.acts_sb, a.acts_st, a.acts_sp, a.acts_sb, nullptr};      // (t, p)
      gemm<T, T, Acc>(nb, q, p, Tn, gt, ac, G.as<Acc>(), p, qp, false, stream);
      Operand<Acc, Acc> g{G.as<Acc>(), qp, 1, 0, nullptr};
      Operand<T, Acc> dt{D, 1, qp, 0, nullptr};  // (x, kk) -> D[kk * qp + x]
      gemm<Acc, T, Acc>(1, nb, k, qp, g, dt, out + b0 * k, k, 0, false, stream);
    }
  } else {
    int64_t chunk = min64(B, max64(1, kBudget / max64(1, Tn * k * q)));
    Workspace Y(sizeof(Acc) * chunk * Tn * k * q, stream);
    Operand<T, Acc> dmat{D, 1, p, 0, nullptr};  // (x, kk*q + j) -> D[(kk*q + j) * p + x]
    for (int64_t b0 = 0; b0 < B; b0 += chunk) {
      int64_t nb = min64(chunk, B - b0);
      Operand<T, Acc> rows{acts + b0 * a.acts_sb, a.acts_st, a.acts_sp, a.acts_sb, nullptr};
      gemm<T, T, Acc>(nb, Tn, k * q, p, rows, dmat, Y.as<Acc>(), k * q, Tn * k * q, false, stream);
      ghost_dot_reduce_kernel<T, Acc><<<static_cast<unsigned>(min64(nb * k, 65535)), kThreads, 0, stream>>>(
          nb, Tn, q, k, Y.as<Acc>(), grads + b0 * a.grads_sb, a.grads_sb, a.grads_st, a.grads_sq, out + b0 * k);
      check_launch("tangent_dot/reduce");
    }
  }
  check_finite<Acc>(out, B * k, kOpTangentDot, err, stream);
}

template <class T>
void kernel_impl(const TangentKernelArgs& a, cudaStream_t stream, unsigned int* err) {
  using Acc = typename AccOf<T>::type;
  const int64_t B = a.batch_a, M = a.batch_b, Ta = a.T, Sb = a.S, p = a.p, q = a.q, qp = p * q;
  Acc* out = static_cast<Acc*>(a.out);
  double ghost = double(B) * M * Ta * Sb * (p + q);
  double expl = (double(B) * Ta + double(M) * Sb) * qp + double(B) * M * qp;
  bool use_ghost = a.strategy == kGhost || (a.strategy == kAuto && ghost <= expl);
  const T* acts_a = static_cast<const T*>(a.acts_a);
  const T* grads_a = static_cast<const T*>(a.grads_a);
  const T* acts_b = static_cast<const T*>(a.acts_b);
  const T* grads_b = static_cast<const T*>(a.grads_b);
  if (!use_ghost) {
    int64_t chunk = max64(1, kBudget / max64(1, qp));
    int64_t ca = min64(chunk, B), cb = min64(chunk, M);
    Workspace Ga(sizeof(Acc) * ca * qp, stream), Gb(sizeof(Acc) * cb * qp, stream);
    auto form = [&](const T* acts, const T* grads, int64_t sb, int64_t st, int64_t sp, int64_t gsb, int64_t gst,
                    int64_t gsq, int64_t Tn, int64_t b0, int64_t nb, Acc* dst) {
      Operand<T, Acc> gt{grads + b0 * gsb, gsq, gst, gsb, nullptr};
      Operand<T, Acc> ac{acts + b0 * sb, st, sp, sb, nullptr};
      gemm<T, T, Acc>(nb, q, p, Tn, gt, ac, dst, p, qp, false, stream);
    };
    for (int64_t a0 = 0; a0 < B; a0 += ca) {
      int64_t na = min64(ca, B - a0);
      form(acts_a, grads_a, a.acts_a_sb, a.acts_a_st, a.acts_a_sp, a.grads_a_sb, a.grads_a_st, a.grads_a_sq, Ta, a0, na, Ga.as<Acc>());
      for (int64_t m0 = 0; m0 < M; m0 += cb) {
        int64_t nb = min64(cb, M - m0);
        if (a0 == 0 || cb < M)
          form(acts_b, grads_b, a.acts_b_sb, a.acts_b_st, a.acts_b_sp, a.grads_b_sb, a.grads_b_st, a.grads_b_sq, Sb, m0, nb, Gb.as<Acc>());
        Operand<Acc, Acc> ga{Ga.as<Acc>(), qp, 1, 0, nullptr};
        Operand<Acc, Acc> gb{Gb.as<Acc>(), 1, qp, 0, nullptr};  // (x, j) -> Gb[j * qp + x]
        gemm<Acc, Acc, Acc>(1, na, nb, qp, ga, gb, out + a0 * M + m0, M, 0, false, stream);
      }
    }
  } else {
    // AA[i, t, (j, s)] = a_i[t] . a'_j[s] and GG likewise, for a chunk of a-examples against all of b.
    int64_t chunk = min64(B, max64(1, kBudget / max64(1, Ta * M * Sb)));
    Workspace AA(sizeof(Acc) * chunk * Ta * M * Sb, stream), GG(sizeof(Acc) * chunk * Ta * M * Sb, stream);
    Workspace copy_a(rows_flat(Sb, a.acts_b_sb, a.acts_b_st) ? 0 : sizeof(T) * M * Sb * p, stream);
    Workspace copy_g(rows_flat(Sb, a.grads_b_sb, a.grads_b_st) ? 0 : sizeof(T) * M * Sb * q, stream);
    Operand<T, Acc> ab = rows_operand<T, Acc>(acts_b, M, Sb, p, a.acts_b_sb, a.acts_b_st, a.acts_b_sp, copy_a, stream);
    Operand<T, Acc> gb = rows_operand<T, Acc>(grads_b, M, Sb, q, a.grads_b_sb, a.grads_b_st, a.grads_b_sq, copy_g, stream);
    Operand<T, Acc> abt{ab.p, ab.cs, ab.rs, 0, nullptr}, gbt{gb.p, gb.cs, gb.rs, 0, nullptr};  // (x, row)
    for (int64_t a0 = 0; a0 < B; a0 += chunk) {
      int64_t na = min64(chunk, B - a0);
      Operand<T, Acc> ar{acts_a + a0 * a.acts_a_sb, a.acts_a_st, a.acts_a_sp, a.acts_a_sb, nullptr};
      Operand<T, Acc> gr{grads_a + a0 * a.grads_a_sb, a.grads_a_st, a.grads_a_sq, a.grads_a_sb, nullptr};
      gemm<T, T, Acc>(na, Ta, M * Sb, p, ar, abt, AA.as<Acc>(), M * Sb, Ta * M * Sb, false, stream);
      gemm<T, T, Acc>(na, Ta, M * Sb, q, gr, gbt, GG.as<Acc>(), M * Sb, Ta * M * Sb, false, stream);
      ghost_kernel_reduce_kernel<Acc><<<grid_for(na * M, kThreads, 4096), kThreads, 0, stream>>>(
          na, M, Ta, Sb, AA.as<Acc>(), GG.as<Acc>(), out + a0 * M, M);
      check_launch("tangent_kernel/reduce");
    }
  }
  check_finite<Acc>(out, B * M, kOpTangentKernel, err, stream);
}

}  // namespace

void tangent_dot(const TangentDotArgs& a, int device, void* stream) {
  DeviceGuard guard(device);
  unsigned int* err = error_word(device);
  NRCORE_CUDA_DISPATCH(a.dtype, T, dot_impl<T>(a, static_cast<cudaStream_t>(stream), err));
}

void tangent_kernel(const TangentKernelArgs& a, int device, void* stream) {
  DeviceGuard guard(device);
  unsigned int* err = error_word(device);
  NRCORE_CUDA_DISPATCH(a.dtype, T, kernel_impl<T>(a, static_cast<cudaStream_t>(stream), err));
}

}  // namespace cuda
}  // namespace nrcore
