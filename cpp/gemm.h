// A small packed GEMM (BLIS-style: pack panels, register-blocked micro-kernel) used by every CPU
// kernel that contracts matrices. Written with GCC vector extensions so one source compiles to
// SSE2, AVX2 or AVX-512 code; included only from the per-ISA translation units, inside the
// namespace nrcore::NRCORE_ISA (see CMakeLists.txt).
#pragma once

#include <cstdint>

#include "nrcore/common.h"

#ifndef NRCORE_ISA
#error "gemm.h is only used by the per-ISA kernel sources"
#endif

namespace nrcore {
namespace NRCORE_ISA {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kVecRegs = 32;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kVecRegs = 16;
#else
constexpr int kVecBytes = 16;
constexpr int kVecRegs = 16;
#endif

template <class T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
};

// Element (i, j) of a strided matrix is p[i * rs + j * cs].
template <class T>
struct View {
  const T* p;
  int64_t rs, cs;
  const T& operator()(int64_t i, int64_t j) const { return p[i * rs + j * cs]; }
  View shifted(int64_t di, int64_t dj) const { return {p + di * rs + dj * cs, rs, cs}; }
  View transposed() const { return {p, cs, rs}; }
};

// C[i * ldc + j] = (accumulate ? C[i * ldc + j] : 0) + sum_k (A(i,k) - asub[k]) * (B(k,j) - bsub[k])
// for i < M, j < N. asub / bsub may be null (no centring). Threads split the larger of M and N.
template <class T>
void gemm(int64_t M, int64_t N, int64_t K, View<T> A, const T* asub, View<T> B, const T* bsub, T* C,
          int64_t ldc, bool accumulate, int nthreads);

// Single-threaded form for callers that already run in parallel (batched contractions).
// `scratch` needs gemm_scratch_elems<T>(M, N, K) elements, 64-byte aligned.
template <class T>
void gemm_serial(int64_t M, int64_t N, int64_t K, View<T> A, const T* asub, View<T> B, const T* bsub, T* C,
                 int64_t ldc, bool accumulate, T* scratch);
template <class T>
int64_t gemm_scratch_elems(int64_t M, int64_t N, int64_t K);

// C[i * ldc + j] = (accumulate ? C : 0) + sum_k A[i * lda + k] * B[j * ldb + k] for row-major A, B
// with contiguous rows: register-blocked dot products, no packing. For long K and a small output
// (contracting per-example gradients with a few directions or with each other), where packing
// would move as many bytes as the multiply reads.
template <class T>
void gemm_rows(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
               bool accumulate, int nthreads);

// C = A B where A(i, k) = base[row_off[i] + k_off[k]]: a separable gather read straight from
// memory by the micro-kernel, no packing (im2col of a padded image: row = (c, ki, kj),
// column = output position). Single-threaded; scratch as for gemm_serial.
template <class T>
void gemm_gather_a(int64_t M, int64_t N, int64_t K, const T* base, const int64_t* row_off, const int64_t* k_off,
                   View<T> B, T* C, int64_t ldc, T* scratch);

}  // namespace NRCORE_ISA
}  // namespace nrcore
