// Packed GEMM for the CPU kernels; see gemm.h. Compiled once per ISA level.
#include "gemm.h"

#include <cstring>

namespace nrcore {
namespace NRCORE_ISA {
namespace {

// Blocking (BLIS): a KC x NR micro-panel of B (16 KiB: NR elements are two vectors) plus an
// MR x KC one of A stay in L1 (32 KiB); MC x KC of A in L2.
constexpr int64_t kKC = 16384 / (2 * kVecBytes);
constexpr int64_t kMC = 240;   // a multiple of every MR below
constexpr int64_t kNC = 512;   // so a KC x NC panel of B and the MC x NC block of C share L2

template <class T, int MR, int NV>
struct Tiling {
  using V = typename VecOf<T>::type;
  static constexpr int L = kVecBytes / sizeof(T);
  static constexpr int NR = NV * L;
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Pack rows [0, mc) x cols [0, kc) of A (already offset) into MR-row panels, k-major, zero padded.
template <class T, int MR>
void pack_a(int64_t mc, int64_t kc, View<T> A, const T* asub, T* dst) {
  for (int64_t ir = 0; ir < mc; ir += MR) {
    int64_t rows = min64(MR, mc - ir);
    if (A.cs == 1) {
      // Rows contiguous in k: read each row sequentially (walking down a column of a row-major
      // matrix whose row stride is a multiple of 4 KiB keeps hitting the same cache sets).
      for (int64_t i = 0; i < MR; ++i) {
        const T* src = i < rows ? &A(ir + i, 0) : nullptr;
        for (int64_t k = 0; k < kc; ++k) dst[k * MR + i] = src ? src[k] - (asub ? asub[k] : T(0)) : T(0);
      }
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        T sub = asub ? asub[k] : T(0);
        T* out = dst + k * MR;
        int64_t i = 0;
        for (; i < rows; ++i) out[i] = A(ir + i, k) - sub;
        for (; i < MR; ++i) out[i] = T(0);
      }
    }
    dst += kc * MR;
  }
}

// Pack rows [0, kc) x cols [0, nc) of B (already offset) into NR-column panels, k-major.
template <class T, int NR>
void pack_b(int64_t kc, int64_t nc, View<T> B, const T* bsub, T* dst) {
  for (int64_t jr = 0; jr < nc; jr += NR) {
    int64_t cols = min64(NR, nc - jr);
    if (B.rs == 1 && B.cs != 1) {
      // Columns contiguous in k (a transposed row-major matrix): read column by column.
      for (int64_t j = 0; j < NR; ++j) {
        const T* src = j < cols ? &B(0, jr + j) : nullptr;
        for (int64_t k = 0; k < kc; ++k) dst[k * NR + j] = src ? src[k] - (bsub ? bsub[k] : T(0)) : T(0);
      }
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        T sub = bsub ? bsub[k] : T(0);
        T* out = dst + k * NR;
        int64_t j = 0;
        if (B.cs == 1) {
          const T* src = &B(k, jr);
          for (; j < cols; ++j) out[j] = src[j] - sub;
        } else {
          for (; j < cols; ++j) out[j] = B(k, jr + j) - sub;
        }
        for (; j < NR; ++j) out[j] = T(0);
      }
    }
    dst += kc * NR;
  }
}

// Where the micro-kernel reads A: a packed MR-row panel (k-major), or a separable gather
// (element (i, k) at row[i][koff[k]], e.g. im2col of a padded image).
template <class T, int MR>
struct PackedA {
  const T* __restrict a;
  const T* row_at(int64_t k) const { return a + k * MR; }
  T get(const T* row, int i) const { return row[i]; }
};
template <class T, int MR>
struct GatheredA {
  const T* const* __restrict row;
  const int64_t* __restrict koff;
  int64_t row_at(int64_t k) const { return koff[k]; }
  T get(int64_t off, int i) const { return row[i][off]; }
};

// MR x NR register tile: c (+)= A * b_panel over kc. Row k of the B panel starts at b + k * ldb
// (ldb = NR for a packed panel, the row stride when B is read in place).
template <class T, int MR, int NV, class ASource>
inline void micro_kernel(int64_t kc, ASource A, const T* __restrict b, int64_t ldb, T* __restrict c, int64_t ldc,
                         bool accumulate, int64_t rows, int64_t cols) {
  using Tl = Tiling<T, MR, NV>;
  using V = typename Tl::V;
  constexpr int L = Tl::L;
  constexpr int NR = Tl::NR;
  V acc[MR][NV];
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  for (int64_t k = 0; k < kc; ++k) {
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], b + k * ldb + v * L, sizeof(V));
    const auto row = A.row_at(k);
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) {
      T ai = A.get(row, i);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += ai * bv[v];
    }
  }
  if (rows == MR && cols == NR) {
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        T* dst = c + i * ldc + v * L;
        if (accumulate) {
          V old;
          std::memcpy(&old, dst, sizeof(V));
          acc[i][v] += old;
        }
        std::memcpy(dst, &acc[i][v], sizeof(V));
      }
    return;
  }
  alignas(64) T tile[MR * NR];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) std::memcpy(tile + i * NR + v * L, &acc[i][v], sizeof(V));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      T val = tile[i * NR + j];
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + val : val;
    }
}

template <class T, int MR, int NV>
void gemm_gathered(int64_t M, int64_t N, int64_t K, const T* base, const int64_t* row_off, const int64_t* k_off,
                   View<T> B, T* C, int64_t ldc, T* scratch) {
  using Tl = Tiling<T, MR, NV>;
  constexpr int NR = Tl::NR;
  if (M <= 0 || N <= 0) return;
  T* bpack = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t(63));
  for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, sizeof(T) * N);
  // K is a handful of output positions for the layers this serves: one B block per KC rows.
  for (int64_t pc = 0; pc < K; pc += kKC) {
    const int64_t kc = min64(kKC, K - pc);
    for (int64_t jc = 0; jc < N; jc += kNC) {
      const int64_t nc = min64(kNC, N - jc);
      pack_b<T, NR>(kc, nc, B.shifted(pc, jc), nullptr, bpack);
      for (int64_t jr = 0; jr < nc; jr += NR)
        for (int64_t ir = 0; ir < M; ir += MR) {
          const T* arow[MR];
          for (int i = 0; i < MR; ++i) arow[i] = base + row_off[ir + i < M ? ir + i : M - 1];  // extra rows discarded
          alignas(64) T part[MR * NR];
          const int64_t rows = min64(MR, M - ir), cols = min64(NR, nc - jr);
          micro_kernel<T, MR, NV>(kc, GatheredA<T, MR>{arow, k_off + pc}, bpack + (jr / NR) * kc * NR, NR, part, NR,
                                  false, MR, NR);
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < cols; ++j) C[(ir + i) * ldc + jc + jr + j] += part[i * NR + j];
        }
    }
  }
}

template <class T, int MR, int NV>
int64_t scratch_elems(int64_t M, int64_t N, int64_t K) {
  using Tl = Tiling<T, MR, NV>;
  int64_t kc = min64(kKC, K), mc = min64(kMC, M), nc = min64(kNC, N);
  return round_up(mc, MR) * kc + round_up(nc, Tl::NR) * kc + 16;
}

template <class T, int MR, int NV>
void gemm_blocked(int64_t M, int64_t N, int64_t K, View<T> A, const T* asub, View<T> B, const T* bsub, T* C,
                  int64_t ldc, bool accumulate, T* scratch) {
  using Tl = Tiling<T, MR, NV>;
  constexpr int NR = Tl::NR;
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, sizeof(T) * N);
    return;
  }
  int64_t kc_max = min64(kKC, K);
  T* apack = scratch;
  T* bpack = scratch + round_up(min64(kMC, M), MR) * kc_max;
  // Keep the B panel 64-byte aligned for the vector loads.
  bpack = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(bpack) + 63) & ~uintptr_t(63));
  // Full-width panels of a B whose rows are contiguous are read in place: packing them would
  // cost as much as the multiply when K is short (per-example gradients: K = positions).
  const bool direct_b = B.cs == 1 && bsub == nullptr;
  for (int64_t jc = 0; jc < N; jc += kNC) {
    int64_t nc = min64(kNC, N - jc);
    for (int64_t pc = 0; pc < K; pc += kKC) {
      int64_t kc = min64(kKC, K - pc);
      bool acc = accumulate || pc > 0;
      const int64_t packed_from = direct_b ? nc / NR * NR : 0;  // columns [packed_from, nc) are packed
      if (packed_from < nc)
        pack_b<T, NR>(kc, nc - packed_from, B.shifted(pc, jc + packed_from), bsub ? bsub + pc : nullptr, bpack);
      for (int64_t ic = 0; ic < M; ic += kMC) {
        int64_t mc = min64(kMC, M - ic);
        pack_a<T, MR>(mc, kc, A.shifted(ic, pc), asub ? asub + pc : nullptr, apack);
        for (int64_t jr = 0; jr < nc; jr += NR) {
          const bool in_place = jr < packed_from;
          const T* b = in_place ? &B(pc, jc + jr) : bpack + ((jr - packed_from) / NR) * kc * NR;
          const int64_t ldb = in_place ? B.rs : NR;
          for (int64_t ir = 0; ir < mc; ir += MR)
            micro_kernel<T, MR, NV>(kc, PackedA<T, MR>{apack + (ir / MR) * kc * MR}, b, ldb, C + (ic + ir) * ldc + jc + jr,
                                    ldc, acc, min64(MR, mc - ir), min64(NR, nc - jr));
        }
      }
    }
  }
}

// RB x CB block of dot products over k in [0, K) (vector accumulators, one reduction at the end).
template <class T, int RB, int CB>
inline void dot_block(int64_t K, const T* const* a, const T* const* b, T out[RB][CB]) {
  using V = typename VecOf<T>::type;
  constexpr int L = kVecBytes / sizeof(T);
  V acc[RB][CB];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < CB; ++c) acc[r][c] = V{};
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    V av[RB], bv[CB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) std::memcpy(&av[r], a[r] + k, sizeof(V));
#pragma GCC unroll 8
    for (int c = 0; c < CB; ++c) std::memcpy(&bv[c], b[c] + k, sizeof(V));
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < CB; ++c) acc[r][c] += av[r] * bv[c];
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < CB; ++c) {
      T sum = T(0);
      for (int l = 0; l < L; ++l) sum += acc[r][c][l];
      for (int64_t kk = k; kk < K; ++kk) sum += a[r][kk] * b[c][kk];
      out[r][c] = sum;
    }
}

// Register budget: MR * NV accumulators + NV loads + 1 broadcast. Narrow problems (N no wider
// than one vector) use one column vector and twice the rows, so small C does not waste lanes.
constexpr int kMRWide = kVecRegs >= 32 ? 12 : 6;
constexpr int kMRNarrow = kVecRegs >= 32 ? 24 : 12;

template <class T>
bool use_narrow(int64_t N) {
  return N <= Tiling<T, kMRNarrow, 1>::NR;
}

}  // namespace

template <class T>
int64_t gemm_scratch_elems(int64_t M, int64_t N, int64_t K) {
  int64_t a = scratch_elems<T, kMRWide, 2>(M, N, K), b = scratch_elems<T, kMRNarrow, 1>(M, N, K);
  return (a > b ? a : b) + 64 / sizeof(T);
}

template <class T>
void gemm_serial(int64_t M, int64_t N, int64_t K, View<T> A, const T* asub, View<T> B, const T* bsub, T* C,
                 int64_t ldc, bool accumulate, T* scratch) {
  if (use_narrow<T>(N))
    gemm_blocked<T, kMRNarrow, 1>(M, N, K, A, asub, B, bsub, C, ldc, accumulate, scratch);
  else
    gemm_blocked<T, kMRWide, 2>(M, N, K, A, asub, B, bsub, C, ldc, accumulate, scratch);
}

template <class T>
void gemm_rows(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
               bool accumulate, int nthreads) {
  constexpr int RB = kVecRegs >= 32 ? 6 : 2, CB = 4;
  // K in blocks that keep an RB + CB row slice in L1 and all of B's slice in L2.
  constexpr int64_t kKB = 8192 / sizeof(T);
  if (M <= 0 || N <= 0) return;
  if (!accumulate)
    for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, sizeof(T) * N);
  const int64_t row_blocks = (M + RB - 1) / RB;
  const int64_t per_block = RB * N * (K > 0 ? K : 1);
  int64_t grain = per_block >= (int64_t(1) << 20) ? 1 : (int64_t(1) << 20) / per_block + 1;
  parallel_for(row_blocks, nthreads, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t k0 = 0; k0 < K; k0 += kKB) {
      const int64_t kb = min64(kKB, K - k0);
      for (int64_t rb = lo; rb < hi; ++rb) {
        const int64_t i0 = rb * RB;
        const T* a[RB];
        for (int r = 0; r < RB; ++r) a[r] = A + min64(i0 + r, M - 1) * lda + k0;  // clamp: extra rows discarded
        for (int64_t j0 = 0; j0 < N; j0 += CB) {
          const T* b[CB];
          for (int c = 0; c < CB; ++c) b[c] = B + min64(j0 + c, N - 1) * ldb + k0;
          T out[RB][CB];
          dot_block<T, RB, CB>(kb, a, b, out);
          for (int r = 0; r < RB && i0 + r < M; ++r)
            for (int c = 0; c < CB && j0 + c < N; ++c) C[(i0 + r) * ldc + j0 + c] += out[r][c];
        }
      }
    }
  });
}

template <class T>
void gemm_gather_a(int64_t M, int64_t N, int64_t K, const T* base, const int64_t* row_off, const int64_t* k_off,
                   View<T> B, T* C, int64_t ldc, T* scratch) {
  if (use_narrow<T>(N))
    gemm_gathered<T, kMRNarrow, 1>(M, N, K, base, row_off, k_off, B, C, ldc, scratch);
  else
    gemm_gathered<T, kMRWide, 2>(M, N, K, base, row_off, k_off, B, C, ldc, scratch);
}

template <class T>
void gemm(int64_t M, int64_t N, int64_t K, View<T> A, const T* asub, View<T> B, const T* bsub, T* C, int64_t ldc,
          bool accumulate, int nthreads) {
  if (M <= 0 || N <= 0) return;
  // Split the dimension with more register tiles; each thread packs its own panels.
  constexpr int64_t kMinFlopsPerThread = int64_t(1) << 20;
  int64_t total = M * N * (K > 0 ? K : 1);
  int64_t max_threads = total / kMinFlopsPerThread;
  int threads = static_cast<int>(min64(nthreads, max_threads < 1 ? 1 : max_threads));
  bool split_rows = (M / kMRWide) >= (N / Tiling<T, kMRWide, 2>::NR);
  int64_t extent = split_rows ? M : N;
  int64_t grain = split_rows ? kMRWide : Tiling<T, kMRWide, 2>::NR;
  int64_t blocks = (extent + grain - 1) / grain;
  parallel_for(blocks, threads, 1, [&](int64_t b0, int64_t b1) {
    int64_t lo = b0 * grain, hi = min64(extent, b1 * grain);
    int64_t sub_m = split_rows ? hi - lo : M, sub_n = split_rows ? N : hi - lo;
    Scratch scratch(sizeof(T) * gemm_scratch_elems<T>(sub_m, sub_n, K));
    if (split_rows)
      gemm_serial<T>(sub_m, N, K, A.shifted(lo, 0), asub, B, bsub, C + lo * ldc, ldc, accumulate, scratch.as<T>());
    else
      gemm_serial<T>(M, sub_n, K, A, asub, B.shifted(0, lo), bsub, C + lo, ldc, accumulate, scratch.as<T>());
  });
}

template void gemm<float>(int64_t, int64_t, int64_t, View<float>, const float*, View<float>, const float*, float*,
                          int64_t, bool, int);
template void gemm<double>(int64_t, int64_t, int64_t, View<double>, const double*, View<double>, const double*,
                           double*, int64_t, bool, int);
template void gemm_serial<float>(int64_t, int64_t, int64_t, View<float>, const float*, View<float>, const float*,
                                 float*, int64_t, bool, float*);
template void gemm_serial<double>(int64_t, int64_t, int64_t, View<double>, const double*, View<double>,
                                  const double*, double*, int64_t, bool, double*);
template void gemm_rows<float>(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                               bool, int);
template void gemm_rows<double>(int64_t, int64_t, int64_t, const double*, int64_t, const double*, int64_t, double*,
                                int64_t, bool, int);
template void gemm_gather_a<float>(int64_t, int64_t, int64_t, const float*, const int64_t*, const int64_t*, View<float>,
                                   float*, int64_t, float*);
template void gemm_gather_a<double>(int64_t, int64_t, int64_t, const double*, const int64_t*, const int64_t*,
                                    View<double>, double*, int64_t, double*);
template int64_t gemm_scratch_elems<float>(int64_t, int64_t, int64_t);
template int64_t gemm_scratch_elems<double>(int64_t, int64_t, int64_t);

}  // namespace NRCORE_ISA
}  // namespace nrcore
