// Shared CUDA helpers: dtype dispatch and conversion, error reporting, device guard, workspace.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "nrcore/common.h"
#include "nrcore/kernels.h"

namespace nrcore {
namespace cuda {

// Op ids for the error word; must match nrcore/ops/_backend.py OP_IDS.
enum OpId : int {
  kOpFbrPrepare = 0,
  kOpFbrDirection = 1,
  kOpFbrUpdate = 2,
  kOpTangentDot = 4,
  kOpTangentKernel = 5,
  kOpBarrierStats = 6,
  kOpBarrierCombine = 7,
};

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("nrcore CUDA ") + what + ": " + cudaGetErrorString(err));
}

// Surface launch-configuration errors right away (no synchronisation).
inline void check_launch(const char* what) { check(cudaGetLastError(), what); }

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

// The device's error word (allocated on first use, which synchronises once).
unsigned int* error_word(int device);

__device__ __forceinline__ void report(unsigned int* word, int status, int op) {
  atomicOr(word, static_cast<unsigned int>(status) | (1u << (8 + op)));
}

// Stream-ordered scratch memory, freed on the same stream when it goes out of scope.
class Workspace {
 public:
  Workspace(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes) check(cudaMallocAsync(&ptr_, bytes, stream), "cudaMallocAsync");
  }
  ~Workspace() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  template <class T>
  T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

// Accumulation type: double for double inputs, float otherwise.
template <class T>
struct AccOf { using type = float; };
template <>
struct AccOf<double> { using type = double; };

template <class Acc>
__device__ __forceinline__ Acc to_acc(float v) { return static_cast<Acc>(v); }
template <class Acc>
__device__ __forceinline__ Acc to_acc(double v) { return static_cast<Acc>(v); }
template <class Acc>
__device__ __forceinline__ Acc to_acc(__half v) { return static_cast<Acc>(__half2float(v)); }
template <class Acc>
__device__ __forceinline__ Acc to_acc(__nv_bfloat16 v) { return static_cast<Acc>(__bfloat162float(v)); }

// Store an accumulator (AccOf<T>: double for double, float otherwise) as T. The accumulator keeps
// its own type on the way: a double must not pass through float (it did once, and float64 outputs
// were float32-accurate).
template <class T>
struct FromAcc {
  __device__ static __forceinline__ T cast(typename AccOf<T>::type v) { return static_cast<T>(v); }
};
template <>
struct FromAcc<__half> {
  __device__ static __forceinline__ __half cast(float v) { return __float2half_rn(v); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  __device__ static __forceinline__ __nv_bfloat16 cast(float v) { return __float2bfloat16_rn(v); }
};
template <class T>
__device__ __forceinline__ T from_acc(typename AccOf<T>::type v) { return FromAcc<T>::cast(v); }

// Report kNonFinite for `op` if any of x[0..n) is not finite (fbr.cu).
template <class Acc>
void check_finite(const Acc* x, int64_t n, int op, unsigned int* err, cudaStream_t stream);

inline unsigned grid_for(int64_t n, int threads, int64_t cap = 65535) {
  int64_t g = (n + threads - 1) / threads;
  return static_cast<unsigned>(g < 1 ? 1 : (g > cap ? cap : g));
}

}  // namespace cuda
}  // namespace nrcore

// Run the body with T bound to the C++ type of a dtype code.
#define NRCORE_CUDA_DISPATCH(code, T, ...)                                              \
  switch (code) {                                                                       \
    case ::nrcore::kFloat32: { using T = float; __VA_ARGS__; } break;                   \
    case ::nrcore::kFloat64: { using T = double; __VA_ARGS__; } break;                  \
    case ::nrcore::kFloat16: { using T = __half; __VA_ARGS__; } break;                  \
    case ::nrcore::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; } break;          \
    default: throw std::invalid_argument("nrcore CUDA: unsupported dtype code");        \
  }
