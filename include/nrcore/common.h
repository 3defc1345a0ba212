// Shared definitions for the CPU (and CUDA host) code: dtype codes, status bits, threading.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace nrcore {

// Must match nrcore/ops/_backend.py.
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Status bits returned by kernels (and OR-ed into the CUDA deferred error word).
enum Status : int {
  kOk = 0,
  kBadLabel = 1,       // a label or index outside its valid range
  kNonFinite = 2,      // a non-finite value in the output (or, for fbr_update_, in direction)
  kDuplicateIndex = 4, // fbr_update_: index repeats an entry
};

#if defined(__CUDACC__)
#define NRCORE_HOST_DEVICE __host__ __device__
#else
#define NRCORE_HOST_DEVICE
#endif

// EBOMLC / MLC-D barrier coefficient max(delta - dot / (sq_w + sq_alpha), 0), defined as 0 when
// the denominator is 0 or the statistics are flagged non-finite (the caller skips that step).
NRCORE_HOST_DEVICE static inline double barrier_coefficient_value(double dot, double sq_w, double sq_alpha, double flag,
                                                           double delta) {
  double denom = sq_w + sq_alpha;
  if (flag != 0.0 || !(denom > 0.0)) return 0.0;
  double beta = delta - dot / denom;
  return beta > 0.0 ? beta : 0.0;
}

// Run fn(begin, end) over [0, n) split into at most `nthreads` contiguous ranges, each of at
// least `min_per_thread` items, on a persistent pool whose threads claim ranges as they get
// scheduled (the caller takes any left, so a late thread on a busy machine delays nothing; see
// dispatch.cpp). The thread handling lives in baseline-ISA code: the per-ISA kernel objects must
// not instantiate library templates such as std::vector, whose linker-merged copies could carry
// AVX-512 code onto an old CPU.
void run_parallel(int workers, int64_t n, void (*body)(void*, int64_t, int64_t), void* ctx);

template <class Fn>
void parallel_for(int64_t n, int nthreads, int64_t min_per_thread, Fn&& fn) {
  if (n <= 0) return;
  int64_t by_work = min_per_thread > 0 ? n / min_per_thread : n;
  int64_t workers = nthreads < 1 ? 1 : nthreads;
  if (by_work < workers) workers = by_work;
  if (n < workers) workers = n;
  if (workers <= 1) {
    fn(int64_t(0), n);
    return;
  }
  using F = typename std::remove_reference<Fn>::type;
  run_parallel(static_cast<int>(workers), n,
               [](void* ctx, int64_t b, int64_t e) { (*static_cast<F*>(ctx))(b, e); }, (void*)&fn);
}

// 64-byte aligned scratch buffers, recycled across calls so that large pack buffers do not page-
// fault on every call.
class Scratch {
 public:
  explicit Scratch(size_t bytes);
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T>
  T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_;
  size_t cap_;
};

}  // namespace nrcore
