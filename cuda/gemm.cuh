// A batched, strided, shared-memory tiled GEMM for the CUDA kernels (fp16/bf16/fp32 inputs with
// fp32 accumulation, fp64 with fp64). Not cuBLAS speed, but the module links nothing beyond the
// CUDA runtime and these contractions are small next to a network's forward/backward.
#pragma once

#include "common.cuh"

namespace nrcore {
namespace cuda {

// Element (b; r, c) is p[b * bs + r * rs + c * cs]; `sub` (optional) is subtracted along K.
template <class T, class Acc>
struct Operand {
  const T* p;
  int64_t rs, cs, bs;
  const Acc* sub;
};

constexpr int kTile = 64, kTileK = 16, kGemmThreads = 256;
// Split-K: a single product with few output tiles and a long K (per-example gradients contracted
// with a few directions or with each other: 128 x 11 or 128 x 128 outputs, K = q p in the tens
// of thousands) would run on a handful of blocks; its K range is split over up to
// kSplitTargetBlocks / tiles blocks of at least kSplitMinChunk each, whose partial products a
// second kernel sums in a fixed order (deterministic).
constexpr int64_t kSplitTargetBlocks = 256, kSplitMinChunk = 512;

// C[b * bsc + i * ldc + j] = (accumulate ? C : 0) + sum_k (A(b; i,k) - asub[k]) (B(b; k,j) - bsub[k]).
// k_split > 0 (batch 1 only): block z of the grid takes k in [z k_split, (z + 1) k_split) and
// writes its partial product to C + z * bsc (accumulate must be false).
template <class TA, class TB, class Acc>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_kernel(int64_t batch, int64_t M, int64_t N, int64_t K, int64_t k_split, Operand<TA, Acc> A,
                Operand<TB, Acc> B, Acc* C, int64_t ldc, int64_t bsc, bool accumulate) {
  __shared__ Acc As[kTileK][kTile + 1];
  __shared__ Acc Bs[kTileK][kTile + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t i0 = int64_t(blockIdx.y) * kTile, j0 = int64_t(blockIdx.x) * kTile;
  const bool split = k_split > 0;
  const int64_t slices = split ? int64_t(gridDim.z) : batch;
  for (int64_t z = blockIdx.z; z < slices; z += gridDim.z) {  // split: exactly one pass per block
    const int64_t b = split ? 0 : z;
    const int64_t k_begin = split ? z * k_split : 0;
    const int64_t k_end = split ? (k_begin + k_split < K ? k_begin + k_split : K) : K;
    Acc acc[4][4];
#pragma unroll
    for (int m = 0; m < 4; ++m)
#pragma unroll
      for (int n = 0; n < 4; ++n) acc[m][n] = Acc(0);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
      // Stage the tiles; walk along whichever index is contiguous in memory so loads coalesce.
      for (int e = threadIdx.x; e < kTile * kTileK; e += kGemmThreads) {
        int ii, kk;
        if (A.cs == 1) { kk = e % kTileK; ii = e / kTileK; } else { ii = e % kTile; kk = e / kTile; }
        int64_t i = i0 + ii, k = k0 + kk;
        Acc v = Acc(0);
        if (i < M && k < k_end) v = to_acc<Acc>(A.p[b * A.bs + i * A.rs + k * A.cs]) - (A.sub ? A.sub[k] : Acc(0));
        As[kk][ii] = v;
        int jj;
        if (B.rs == 1 && B.cs != 1) { kk = e % kTileK; jj = e / kTileK; } else { jj = e % kTile; kk = e / kTile; }
        int64_t j = j0 + jj;
        k = k0 + kk;
        Acc w = Acc(0);
        if (j < N && k < k_end) w = to_acc<Acc>(B.p[b * B.bs + k * B.rs + j * B.cs]) - (B.sub ? B.sub[k] : Acc(0));
        Bs[kk][jj] = w;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kTileK; ++kk) {
        Acc a[4], bv[4];
#pragma unroll
        for (int m = 0; m < 4; ++m) a[m] = As[kk][ty + 16 * m];
#pragma unroll
        for (int n = 0; n < 4; ++n) bv[n] = Bs[kk][tx + 16 * n];
#pragma unroll
        for (int m = 0; m < 4; ++m)
#pragma unroll
          for (int n = 0; n < 4; ++n) acc[m][n] += a[m] * bv[n];
      }
      __syncthreads();
    }
#pragma unroll
    for (int m = 0; m < 4; ++m)
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        int64_t i = i0 + ty + 16 * m, j = j0 + tx + 16 * n;
        if (i < M && j < N) {
          Acc* dst = C + z * bsc + i * ldc + j;
          *dst = accumulate ? *dst + acc[m][n] : acc[m][n];
        }
      }
  }
}

// C[i * ldc + j] = (accumulate ? C : 0) + sum over z < splits of partial[z][i][j] (partial: [splits, M, N]).
template <class Acc>
__global__ void split_k_sum_kernel(int64_t splits, int64_t M, int64_t N, const Acc* partial, Acc* C, int64_t ldc,
                                   bool accumulate) {
  const int64_t n = M * N;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    Acc s = Acc(0);
    for (int64_t z = 0; z < splits; ++z) s += partial[z * n + e];
    Acc* dst = C + (e / N) * ldc + e % N;
    *dst = accumulate ? *dst + s : s;
  }
}

template <class TA, class TB, class Acc>
void gemm(int64_t batch, int64_t M, int64_t N, int64_t K, Operand<TA, Acc> A, Operand<TB, Acc> B, Acc* C,
          int64_t ldc, int64_t bsc, bool accumulate, cudaStream_t stream) {
  if (batch <= 0 || M <= 0 || N <= 0) return;
  int64_t gx = (N + kTile - 1) / kTile, gy = (M + kTile - 1) / kTile;
  if (gx > 2147483647 || gy > 65535) throw std::invalid_argument("nrcore CUDA gemm: matrix too large for one launch");
  const int64_t tiles = gx * gy;
  int64_t splits = batch == 1 && tiles < kSplitTargetBlocks ? kSplitTargetBlocks / tiles : 1;
  if (splits > K / kSplitMinChunk) splits = K / kSplitMinChunk;
  if (splits >= 2) {
    int64_t chunk = (K + splits - 1) / splits;
    chunk = (chunk + kTileK - 1) / kTileK * kTileK;
    splits = (K + chunk - 1) / chunk;
    Workspace partial(sizeof(Acc) * splits * M * N, stream);
    dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(splits));
    gemm_kernel<TA, TB, Acc><<<grid, kGemmThreads, 0, stream>>>(1, M, N, K, chunk, A, B, partial.as<Acc>(), N, M * N, false);
    check_launch("gemm (split K)");
    split_k_sum_kernel<Acc><<<grid_for(M * N, kGemmThreads, 4096), kGemmThreads, 0, stream>>>(splits, M, N, partial.as<Acc>(), C,
                                                                                            ldc, accumulate);
    check_launch("gemm (split-K sum)");
    return;
  }
  dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(batch < 65535 ? batch : 65535));
  gemm_kernel<TA, TB, Acc><<<grid, kGemmThreads, 0, stream>>>(batch, M, N, K, 0, A, B, C, ldc, bsc, accumulate);
  check_launch("gemm");
}

}  // namespace cuda
}  // namespace nrcore
