// FBR (closed form of Algorithm 1) on CUDA: prepare (per epoch), direction (per batch: one block
// per row, no B x m matrix) and update.
#include "nrcore/fbr_formula.h"
#include "common.cuh"
#include "nrcore/launch.h"

namespace nrcore {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__global__ void count_labels_kernel(int64_t m, const int64_t* labels, int64_t ls, int64_t C, int64_t* counts,
                                    unsigned int* err) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < m; j += int64_t(gridDim.x) * blockDim.x) {
    int64_t y = labels[j * ls];
    if (y < 0 || y >= C)
      report(err, kBadLabel, kOpFbrPrepare);
    else
      atomicAdd(reinterpret_cast<unsigned long long*>(counts + y), 1ull);
  }
}

// One thread per feature column: the column's mean, its per-class sums of centred values (in the
// double scratch [d, C+1]; column C gets the plain sum), and its share of sum |phi_j - mu|^2.
template <class T>
__global__ void column_sums_kernel(int64_t m, int64_t d, int64_t C, const T* feats, int64_t rs, int64_t cs,
                                   const int64_t* labels, int64_t ls, bool center, double* sums, double* mu_out,
                                   double* sq_total) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < d; k += int64_t(gridDim.x) * blockDim.x) {
    double total = 0.0;
    for (int64_t j = 0; j < m; ++j) total += to_acc<double>(feats[j * rs + k * cs]);
    double mu = center ? total / static_cast<double>(m) : 0.0;
    double sq = 0.0;
    double* row = sums + k * (C + 1);
    for (int64_t j = 0; j < m; ++j) {
      int64_t y = labels[j * ls];
      double v = to_acc<double>(feats[j * rs + k * cs]) - mu;
      sq += v * v;
      if (y >= 0 && y < C) row[y] += v;
    }
    row[C] = center ? 0.0 : total;
    mu_out[k] = mu;
    atomicAdd(sq_total, sq);
  }
}

template <class Acc>
__global__ void finalize_prepare_kernel(int64_t m, int64_t d, int64_t C, const double* sums, const double* mu,
                                        const int64_t* counts, Acc* mean, Acc* basis_t, double* sq_norm_mean,
                                        unsigned int* err) {
  const int64_t n = d * (C + 1);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    int64_t k = e / (C + 1), c = e % (C + 1);
    double v = sums[e];
    if (c < C) v = counts[c] > 0 ? v / static_cast<double>(counts[c]) : 0.0;
    basis_t[e] = static_cast<Acc>(v);
    if (c == 0) mean[k] = static_cast<Acc>(mu[k]);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    double sq = *sq_norm_mean / static_cast<double>(m);
    *sq_norm_mean = sq;
    if (!isfinite(sq)) report(err, kNonFinite, kOpFbrPrepare);
  }
}

template <class T, class Acc>
__global__ void __launch_bounds__(kThreads) direction_kernel(FbrDirectionArgs a, unsigned int* err) {
  extern __shared__ unsigned char smem_raw[];
  Acc* f = reinterpret_cast<Acc*>(smem_raw);  // [d] centred feature row
  Acc* scores = f + a.d;                      // [cols]
  Acc* partial = scores + a.num_classes + 1;  // [kThreads]
  const T* feats = static_cast<const T*>(a.feats);
  const Acc* mean = static_cast<const Acc*>(a.mean);
  const Acc* basis = static_cast<const Acc*>(a.basis_t);
  Acc* out = static_cast<Acc*>(a.out);
  const int64_t C = a.num_classes, ld = C + 1, cols = a.use_total ? C + 1 : C;
  const int tid = threadIdx.x;
  // Threads = class lanes x k-groups: lanes read consecutive columns of basis_t (coalesced).
  const int lanes = static_cast<int>(cols >= kThreads ? kThreads : (cols + 31) / 32 * 32);
  const int groups = kThreads / lanes;
  const int lane = tid % lanes, group = tid / lanes;
  for (int64_t row = blockIdx.x; row < a.batch; row += gridDim.x) {
    for (int64_t k = tid; k < a.d; k += kThreads) f[k] = to_acc<Acc>(feats[row * a.feats_rs + k * a.feats_cs]) - mean[k];
    __syncthreads();
    for (int64_t c0 = 0; c0 < cols; c0 += lanes) {
      int64_t c = c0 + lane;
      Acc s = Acc(0);
      if (group < groups && c < cols)
        for (int64_t k = group; k < a.d; k += groups) s += f[k] * basis[k * ld + c];
      partial[tid] = s;
      __syncthreads();
      if (tid < lanes && c0 + tid < cols) {
        Acc total = Acc(0);
        for (int g = 0; g < groups; ++g) total += partial[g * lanes + tid];
        scores[c0 + tid] = total;
      }
      __syncthreads();
    }
    if (tid == 0) {
      int64_t y = a.labels[row * a.labels_s];
      if (y < 0 || y >= C) {
        report(err, kBadLabel, kOpFbrDirection);
        out[row] = Acc(0);
      } else {
        double m = 0.0;
        for (int64_t c = 0; c < C; ++c) m += static_cast<double>(a.counts[c]);
        double total = a.use_total ? static_cast<double>(scores[C]) : 0.0;
        double dir = a.scale * fbr_closed_form(scores, a.counts, C, y, total, m, a.row_shift, a.label_sign,
                                               a.lambda_pos, a.lambda_neg);
        out[row] = static_cast<Acc>(dir);
        if (!isfinite(static_cast<double>(out[row]))) report(err, kNonFinite, kOpFbrDirection);
      }
    }
    __syncthreads();
  }
}

template <class T>
__global__ void update_kernel(FbrUpdateArgs a, unsigned int* err) {
  T* w = static_cast<T*>(a.weights);
  const T* dir = static_cast<const T*>(a.direction);
  const T step = static_cast<T>(a.step_size);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < a.batch; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t j = a.index[i * a.index_s];
    T d = dir[i * a.direction_s];
    if (j < 0 || j >= a.n) {
      report(err, kBadLabel, kOpFbrUpdate);
      continue;
    }
    if (!isfinite(d)) {  // leave the weight alone: persistent state must not turn NaN
      report(err, kNonFinite, kOpFbrUpdate);
      continue;
    }
    T v = w[j * a.weights_s] + step * d;
    w[j * a.weights_s] = v < T(0) ? T(0) : (v > T(1) ? T(1) : v);
  }
}

template <class Acc>
__global__ void check_finite_kernel(const Acc* x, int64_t n, int op, unsigned int* err) {
  bool bad = false;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    bad |= !isfinite(x[i]);
  if (__syncthreads_or(bad) && threadIdx.x == 0) report(err, kNonFinite, op);
}

}  // namespace

template <class Acc>
void check_finite(const Acc* x, int64_t n, int op, unsigned int* err, cudaStream_t stream) {
  if (n <= 0) return;
  check_finite_kernel<Acc><<<grid_for(n, kThreads, 1024), kThreads, 0, stream>>>(x, n, op, err);
  check_launch("check_finite");
}
template void check_finite<float>(const float*, int64_t, int, unsigned int*, cudaStream_t);
template void check_finite<double>(const double*, int64_t, int, unsigned int*, cudaStream_t);

void fbr_prepare(const FbrPrepareArgs& a, int device, void* stream_ptr) {
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  unsigned int* err = error_word(device);
  const int64_t C = a.num_classes;
  check(cudaMemsetAsync(a.counts, 0, sizeof(int64_t) * C, stream), "memset");
  check(cudaMemsetAsync(a.sq_norm_mean, 0, sizeof(double), stream), "memset");
  Workspace sums(sizeof(double) * a.d * (C + 1), stream), mu(sizeof(double) * a.d, stream);
  check(cudaMemsetAsync(sums.as<double>(), 0, sizeof(double) * a.d * (C + 1), stream), "memset");
  count_labels_kernel<<<grid_for(a.m, kThreads, 1024), kThreads, 0, stream>>>(a.m, a.labels, a.labels_s, C, a.counts, err);
  check_launch("fbr_prepare/count");
  NRCORE_CUDA_DISPATCH(a.dtype, T, {
    column_sums_kernel<T><<<grid_for(a.d, 128), 128, 0, stream>>>(a.m, a.d, C, static_cast<const T*>(a.feats), a.feats_rs,
                                                                  a.feats_cs, a.labels, a.labels_s, a.center,
                                                                  sums.as<double>(), mu.as<double>(), a.sq_norm_mean);
    check_launch("fbr_prepare/sums");
    using Acc = typename AccOf<T>::type;
    finalize_prepare_kernel<Acc><<<grid_for(a.d * (C + 1), kThreads, 4096), kThreads, 0, stream>>>(
        a.m, a.d, C, sums.as<double>(), mu.as<double>(), a.counts, static_cast<Acc*>(a.mean),
        static_cast<Acc*>(a.basis_t), a.sq_norm_mean, err);
    check_launch("fbr_prepare/finalize");
  });
}

void fbr_direction(const FbrDirectionArgs& a, int device, void* stream_ptr) {
  if (a.batch <= 0) return;
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  unsigned int* err = error_word(device);
  NRCORE_CUDA_DISPATCH(a.dtype, T, {
    using Acc = typename AccOf<T>::type;
    size_t smem = sizeof(Acc) * (a.d + a.num_classes + 1 + kThreads);
    if (smem > 48 * 1024)
      check(cudaFuncSetAttribute(direction_kernel<T, Acc>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
            "fbr_direction: feature dimension too large for shared memory");
    unsigned grid = static_cast<unsigned>(a.batch < 65535 ? a.batch : 65535);
    direction_kernel<T, Acc><<<grid, kThreads, smem, stream>>>(a, err);
    check_launch("fbr_direction");
  });
}

void fbr_update(const FbrUpdateArgs& a, int device, void* stream_ptr) {
  if (a.batch <= 0) return;
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  unsigned int* err = error_word(device);
  if (a.dtype == kFloat64)
    update_kernel<double><<<grid_for(a.batch, kThreads), kThreads, 0, stream>>>(a, err);
  else if (a.dtype == kFloat32)
    update_kernel<float><<<grid_for(a.batch, kThreads), kThreads, 0, stream>>>(a, err);
  else
    throw std::invalid_argument("fbr_update_: weights must be float32 or float64");
  check_launch("fbr_update_");
}

}  // namespace cuda
}  // namespace nrcore
