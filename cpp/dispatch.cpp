// Baseline-ISA support code: the CPU kernel table for this machine, threads, scratch memory.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace nrcore {

namespace {

bool cpu_has(const char* level) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (std::strcmp(level, "v4") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && cpu_has("v3");
  if (std::strcmp(level, "v3") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
           __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("movbe");
#endif
  (void)level;
  return false;
}

// `cap` (base|v3|v4) caps the level; it never raises it past what the CPU supports.
const CpuKernels& select_kernels(const std::string& cap) {
#if defined(NRCORE_HAVE_ISA_V4)
  if (cap == "v4" && cpu_has("v4")) return v4::kernel_table();
#endif
#if defined(NRCORE_HAVE_ISA_V3)
  if ((cap == "v4" || cap == "v3") && cpu_has("v3")) return v3::kernel_table();
#endif
  return base::kernel_table();
}

// Recycled aligned buffers (a handful, so steady-state calls do not page-fault).
std::mutex g_pool_mutex;
std::vector<std::pair<void*, size_t>> g_pool;
constexpr size_t kPoolSlots = 16;
constexpr size_t kMaxPooledBytes = size_t(32) << 20;  // bigger buffers go straight back

}  // namespace

namespace {
const CpuKernels* initial_kernels() {
  const char* cap = std::getenv("NRCORE_CPU_ISA");  // e.g. to run a whole program on the fallbacks
  return &select_kernels(cap ? cap : "v4");
}
std::atomic<const CpuKernels*> g_kernels{initial_kernels()};
}  // namespace

const CpuKernels& cpu_kernels() { return *g_kernels.load(std::memory_order_relaxed); }

const char* set_cpu_isa(const std::string& cap) {
  g_kernels.store(&select_kernels(cap));
  return cpu_kernels().isa;
}

void run_parallel(int workers, int64_t n, void (*body)(void*, int64_t, int64_t), void* ctx) {
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  int64_t chunk = (n + workers - 1) / workers;
  for (int w = 1; w < workers; ++w) {
    int64_t b = w * chunk, e = std::min(n, b + chunk);
    if (b < e) threads.emplace_back([=] { body(ctx, b, e); });
  }
  body(ctx, 0, std::min(n, chunk));
  for (auto& t : threads) t.join();
}

Scratch::Scratch(size_t bytes) : ptr_(nullptr), cap_(0) {
  if (bytes == 0) bytes = 64;
  {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    size_t best = g_pool.size();
    for (size_t i = 0; i < g_pool.size(); ++i)
      if (g_pool[i].second >= bytes && (best == g_pool.size() || g_pool[i].second < g_pool[best].second)) best = i;
    if (best < g_pool.size()) {
      ptr_ = g_pool[best].first;
      cap_ = g_pool[best].second;
      g_pool.erase(g_pool.begin() + best);
      return;
    }
  }
  cap_ = (bytes + 63) / 64 * 64;
  ptr_ = std::aligned_alloc(64, cap_);
  if (!ptr_) throw std::bad_alloc();
}

Scratch::~Scratch() {
  if (cap_ > kMaxPooledBytes) {
    std::free(ptr_);
    return;
  }
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_pool.size() >= kPoolSlots) {
    // Drop the smallest cached buffer (or this one) to bound what the pool keeps.
    size_t smallest = 0;
    for (size_t i = 1; i < g_pool.size(); ++i)
      if (g_pool[i].second < g_pool[smallest].second) smallest = i;
    if (g_pool[smallest].second < cap_) {
      std::free(g_pool[smallest].first);
      g_pool[smallest] = {ptr_, cap_};
    } else {
      std::free(ptr_);
    }
    return;
  }
  g_pool.emplace_back(ptr_, cap_);
}

}  // namespace nrcore
