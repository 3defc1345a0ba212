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

// C[b * bsc + i * ldc + j] = (accumulate ? C : 0) + sum_k (A(b; i,k) - asub[k]) (B(b; k,j) - bsub[k])
template <class TA, class TB, class Acc>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_kernel(int64_t batch, int64_t M, int64_t N, int64_t K, Operand<TA, Acc> A, Operand<TB, Acc> B, Acc* C,
                int64_t ldc, int64_t bsc, bool accumulate) {
  __shared__ Acc As[kTileK][kTile + 1];
  __shared__ Acc Bs[kTileK][kTile + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t i0 = int64_t(blockIdx.y) * kTile, j0 = int64_t(blockIdx.x) * kTile;
  for (int64_t b = blockIdx.z; b < batch; b += gridDim.z) {
    Acc acc[4][4];
#pragma unroll
    for (int m = 0; m < 4; ++m)
#pragma unroll
      for (int n = 0; n < 4; ++n) acc[m][n] = Acc(0);
    for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
      // Stage the tiles; walk along whichever index is contiguous in memory so loads coalesce.
      for (int e = threadIdx.x; e < kTile * kTileK; e += kGemmThreads) {
        int ii, kk;
        if (A.cs == 1) { kk = e % kTileK; ii = e / kTileK; } else { ii = e % kTile; kk = e / kTile; }
        int64_t i = i0 + ii, k = k0 + kk;
        Acc v = Acc(0);
        if (i < M && k < K) v = to_acc<Acc>(A.p[b * A.bs + i * A.rs + k * A.cs]) - (A.sub ? A.sub[k] : Acc(0));
        As[kk][ii] = v;
        int jj;
        if (B.rs == 1 && B.cs != 1) { kk = e % kTileK; jj = e / kTileK; } else { jj = e % kTile; kk = e / kTile; }
        int64_t j = j0 + jj;
        k = k0 + kk;
        Acc w = Acc(0);
        if (j < N && k < K) w = to_acc<Acc>(B.p[b * B.bs + k * B.rs + j * B.cs]) - (B.sub ? B.sub[k] : Acc(0));
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
          Acc* dst = C + b * bsc + i * ldc + j;
          *dst = accumulate ? *dst + acc[m][n] : acc[m][n];
        }
      }
  }
}

template <class TA, class TB, class Acc>
void gemm(int64_t batch, int64_t M, int64_t N, int64_t K, Operand<TA, Acc> A, Operand<TB, Acc> B, Acc* C,
          int64_t ldc, int64_t bsc, bool accumulate, cudaStream_t stream) {
  if (batch <= 0 || M <= 0 || N <= 0) return;
  int64_t gx = (N + kTile - 1) / kTile, gy = (M + kTile - 1) / kTile;
  if (gx > 2147483647 || gy > 65535) throw std::invalid_argument("nrcore CUDA gemm: matrix too large for one launch");
  dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(batch < 65535 ? batch : 65535));
  gemm_kernel<TA, TB, Acc><<<grid, kGemmThreads, 0, stream>>>(batch, M, N, K, A, B, C, ldc, bsc, accumulate);
  check_launch("gemm");
}

}  // namespace cuda
}  // namespace nrcore
