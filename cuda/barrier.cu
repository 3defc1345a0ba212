// Barrier reductions on CUDA as multi-tensor launches (apex-style): the pointers of up to
// kMaxTensors tensors and a block -> (tensor, chunk) map travel in the kernel arguments, so a
// whole gradient list costs a couple of launches, not one per tensor. Partial sums are per block
// and reduced in a fixed order (deterministic), in float64.
#include "common.cuh"
#include "nrcore/launch.h"

namespace nrcore {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTensors = 48;
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 65536;

template <int Depth>
struct TensorList {
  const void* ptr[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
  int first_block;  // index of this launch's first block among all blocks of the op
};

// Calls launch(list, num_blocks) for lists of tensors split into chunk-sized blocks. ptrs[d][i]
// is tensor i's pointer for list d.
template <int Depth, class Launch>
int for_each_launch(int64_t num, const void* const* const* ptrs, const int64_t* numel, int first_block, Launch&& launch) {
  TensorList<Depth> list;
  int tensors = 0, blocks = 0;
  int64_t last = -1;  // tensor index behind the list's last entry
  list.first_block = first_block;
  for (int64_t i = 0; i < num; ++i) {
    if (numel[i] <= 0) continue;
    int64_t chunks = (numel[i] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      bool added = tensors > 0 && last == i;
      if (blocks == kMaxBlocks || (!added && tensors == kMaxTensors)) {
        launch(list, blocks);
        list.first_block += blocks;
        blocks = 0;
        tensors = 0;
        added = false;
      }
      if (!added) {
        for (int d = 0; d < Depth; ++d) list.ptr[d][tensors] = ptrs[d] ? ptrs[d][i] : nullptr;
        list.numel[tensors] = numel[i];
        ++tensors;
        last = i;
      }
      list.block_tensor[blocks] = static_cast<unsigned char>(tensors - 1);
      list.block_chunk[blocks] = static_cast<int>(c);
      ++blocks;
    }
  }
  if (blocks) launch(list, blocks);
  return list.first_block + blocks;
}

int64_t count_blocks(int64_t num, const int64_t* numel) {
  int64_t n = 0;
  for (int64_t i = 0; i < num; ++i)
    if (numel[i] > 0) n += (numel[i] + kChunk - 1) / kChunk;
  return n;
}

__device__ __forceinline__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) shared[threadIdx.x] += shared[threadIdx.x + w];
    __syncthreads();
  }
  double total = shared[0];
  __syncthreads();
  return total;
}

// Depth 2: (f, q) pairs -> partial (dot, |q|^2, 0); depth 1: alpha -> (0, 0, |alpha|^2).
template <class T, int Depth>
__global__ void __launch_bounds__(kThreads) stats_kernel(TensorList<Depth> list, double* partials) {
  __shared__ double shared[kThreads];
  const int t = list.block_tensor[blockIdx.x];
  const int64_t begin = list.block_chunk[blockIdx.x] * kChunk;
  const int64_t end = begin + kChunk < list.numel[t] ? begin + kChunk : list.numel[t];
  const T* x = static_cast<const T*>(list.ptr[0][t]);
  const T* y = static_cast<const T*>(list.ptr[Depth - 1][t]);
  double xy = 0.0, yy = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    double yv = to_acc<double>(y[i]);
    xy += to_acc<double>(x[i]) * yv;
    yy += yv * yv;
  }
  xy = block_sum(xy, shared);
  yy = block_sum(yy, shared);
  if (threadIdx.x == 0) {
    double* out = partials + 3 * (list.first_block + blockIdx.x);
    out[0] = Depth == 2 ? xy : 0.0;
    out[1] = Depth == 2 ? yy : 0.0;
    out[2] = Depth == 2 ? 0.0 : yy;
  }
}

__global__ void __launch_bounds__(kThreads) stats_final_kernel(const double* partials, int64_t blocks, double* out) {
  __shared__ double shared[kThreads];
  double sums[3] = {0.0, 0.0, 0.0};
  for (int64_t b = threadIdx.x; b < blocks; b += kThreads)
    for (int j = 0; j < 3; ++j) sums[j] += partials[3 * b + j];
  for (int j = 0; j < 3; ++j) sums[j] = block_sum(sums[j], shared);
  if (threadIdx.x == 0) {
    bool finite = isfinite(sums[0]) && isfinite(sums[1]) && isfinite(sums[2]);
    out[0] = sums[0];
    out[1] = sums[1];
    out[2] = sums[2];
    out[3] = finite ? 0.0 : 1.0;
  }
}

// outs = f + coef * q (f may be absent), computed in the accumulation type; non-finite outputs
// are reported. A nonzero *skip (a step the caller skips) leaves outs untouched and reports nothing.
template <class T>
__global__ void __launch_bounds__(kThreads) combine_kernel(TensorList<3> list, double coef, const double* coef_ptr,
                                                           const double* skip, unsigned int* err) {
  if (skip && *skip != 0.0) return;  // uniform across the block: no thread reaches the barrier below
  using Acc = typename AccOf<T>::type;
  const int t = list.block_tensor[blockIdx.x];
  const int64_t begin = list.block_chunk[blockIdx.x] * kChunk;
  const int64_t end = begin + kChunk < list.numel[t] ? begin + kChunk : list.numel[t];
  T* out = static_cast<T*>(const_cast<void*>(list.ptr[0][t]));
  const T* f = static_cast<const T*>(list.ptr[1][t]);
  const T* q = static_cast<const T*>(list.ptr[2][t]);
  const Acc c = static_cast<Acc>(coef_ptr ? *coef_ptr : coef);
  bool bad = false;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    Acc v = c * to_acc<Acc>(q[i]);
    if (f) v += to_acc<Acc>(f[i]);
    bad |= !isfinite(v);
    out[i] = from_acc<T>(v);
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) report(err, kNonFinite, kOpBarrierCombine);
}

}  // namespace

void barrier_stats(const BarrierStatsArgs& a, int device, void* stream_ptr) {
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  int64_t blocks = count_blocks(a.num_pairs, a.pair_numel) + count_blocks(a.num_alpha, a.alpha_numel);
  Workspace partials(sizeof(double) * 3 * (blocks > 0 ? blocks : 1), stream);
  const void* const* pair_ptrs[2] = {a.f, a.q};
  const void* const* alpha_ptrs[1] = {a.alpha};
  int next = 0;
  NRCORE_CUDA_DISPATCH(a.pair_dtype, T, {
    next = for_each_launch<2>(a.num_pairs, pair_ptrs, a.pair_numel, 0, [&](const TensorList<2>& list, int n) {
      stats_kernel<T, 2><<<n, kThreads, 0, stream>>>(list, partials.as<double>());
      check_launch("barrier_stats");
    });
  });
  NRCORE_CUDA_DISPATCH(a.alpha_dtype, T, {
    for_each_launch<1>(a.num_alpha, alpha_ptrs, a.alpha_numel, next, [&](const TensorList<1>& list, int n) {
      stats_kernel<T, 1><<<n, kThreads, 0, stream>>>(list, partials.as<double>());
      check_launch("barrier_stats");
    });
  });
  stats_final_kernel<<<1, kThreads, 0, stream>>>(partials.as<double>(), blocks, a.out);
  check_launch("barrier_stats/final");
}

void barrier_combine(const BarrierCombineArgs& a, int device, void* stream_ptr) {
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  unsigned int* err = error_word(device);
  const void* const* ptrs[3] = {reinterpret_cast<const void* const*>(a.outs), a.f, a.q};
  NRCORE_CUDA_DISPATCH(a.dtype, T, {
    for_each_launch<3>(a.num, ptrs, a.numel, 0, [&](const TensorList<3>& list, int n) {
      combine_kernel<T><<<n, kThreads, 0, stream>>>(list, a.coef, a.coef_ptr, a.skip, err);
      check_launch("barrier_combine_");
    });
  });
}

}  // namespace cuda
}  // namespace nrcore
