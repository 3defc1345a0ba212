// Per-device error words and the barrier coefficient (a one-thread kernel).
#include <mutex>

#include "common.cuh"
#include "nrcore/launch.h"

namespace nrcore {
namespace cuda {

namespace {
constexpr int kMaxDevices = 64;
std::mutex g_words_mutex;
unsigned int* g_words[kMaxDevices] = {nullptr};
}  // namespace

unsigned int* error_word(int device) {
  if (device < 0 || device >= kMaxDevices) throw std::invalid_argument("nrcore CUDA: device index out of range");
  std::lock_guard<std::mutex> lock(g_words_mutex);
  if (!g_words[device]) {
    DeviceGuard guard(device);
    unsigned int* word = nullptr;
    check(cudaMalloc(&word, sizeof(unsigned int)), "cudaMalloc(error word)");
    check(cudaMemset(word, 0, sizeof(unsigned int)), "cudaMemset(error word)");
    g_words[device] = word;
  }
  return g_words[device];
}

int take_errors(int device) {
  {
    std::lock_guard<std::mutex> lock(g_words_mutex);
    if (device < 0 || device >= kMaxDevices || !g_words[device]) return 0;
  }
  DeviceGuard guard(device);
  unsigned int* word = error_word(device);
  unsigned int value = 0;
  check(cudaDeviceSynchronize(), "synchronize");
  check(cudaMemcpy(&value, word, sizeof(value), cudaMemcpyDeviceToHost), "read error word");
  check(cudaMemset(word, 0, sizeof(value)), "reset error word");
  return static_cast<int>(value);
}

namespace {
__global__ void barrier_coefficient_kernel(const double* stats, double delta, double* out) {
  *out = barrier_coefficient_value(stats[0], stats[1], stats[2], stats[3], delta);
}
}  // namespace

void barrier_coefficient(const double* stats, double delta, double* out, int device, void* stream) {
  DeviceGuard guard(device);
  barrier_coefficient_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(stats, delta, out);
  check_launch("barrier_coefficient");
}

}  // namespace cuda
}  // namespace nrcore
