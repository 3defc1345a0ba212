// Baseline-ISA support code: the CPU kernel table for this machine, threads, scratch memory.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <pthread.h>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "nrcore/common.h"
#include "nrcore/kernels.h"

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

// Recycled aligned scratch buffers (a handful, so steady-state calls do not page-fault).
std::mutex g_scratch_mutex;
std::vector<std::pair<void*, size_t>> g_scratch_cache;
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

namespace {

// A job split into `chunks` contiguous ranges that threads claim one at a time. Whoever is
// running claims the next range, so a worker that the OS schedules late (a busy shared
// machine) simply finds nothing left instead of holding everyone up.
struct Job {
  void (*body)(void*, int64_t, int64_t);
  void* ctx;
  int64_t n, chunk, chunks;
  int max_helpers;
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<int> helpers{0};

  void work() {
    for (;;) {
      int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks) return;
      int64_t b = c * chunk, e = std::min(n, b + chunk);
      body(ctx, b, e);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Persistent worker threads that sleep until a job is posted (no spinning while idle).
class Pool {
 public:
  void run(const std::shared_ptr<Job>& job) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(threads_.size()) < job->max_helpers) threads_.emplace_back([this] { loop(); });
      job_ = job;
      ++generation_;
    }
    wake_.notify_all();
    job->work();
    // Only chunks already claimed can be outstanding; wait for them.
    while (job->done.load(std::memory_order_acquire) < job->chunks) std::this_thread::yield();
    std::lock_guard<std::mutex> lock(mutex_);
    if (job_ == job) job_.reset();
  }

 private:
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
      }
      if (job && job->helpers.fetch_add(1) < job->max_helpers) job->work();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> threads_;
  std::shared_ptr<Job> job_;
  uint64_t generation_ = 0;
};

// Leaked on purpose (no exit-order problems); replaced in a forked child, whose copy of the
// pool refers to threads that do not exist there.
std::atomic<Pool*> g_pool_threads{nullptr};
std::mutex g_pool_create;

void reset_after_fork() { g_pool_threads.store(nullptr); }

Pool& thread_pool() {
  Pool* pool = g_pool_threads.load();
  if (pool) return *pool;
  std::lock_guard<std::mutex> lock(g_pool_create);
  static bool registered = (pthread_atfork(nullptr, nullptr, reset_after_fork), true);
  (void)registered;
  pool = g_pool_threads.load();
  if (!pool) {
    pool = new Pool();
    g_pool_threads.store(pool);
  }
  return *pool;
}

// One caller at a time uses the pool; concurrent callers (several Python threads) run serially.
std::mutex g_pool_user;

}  // namespace

void run_parallel(int workers, int64_t n, void (*body)(void*, int64_t, int64_t), void* ctx) {
  std::unique_lock<std::mutex> lock(g_pool_user, std::try_to_lock);
  if (!lock.owns_lock()) {  // the pool is busy with another caller's job: do this one alone
    body(ctx, 0, n);
    return;
  }
  auto job = std::make_shared<Job>();
  job->body = body;
  job->ctx = ctx;
  job->n = n;
  job->chunks = workers;
  job->chunk = (n + workers - 1) / workers;
  job->max_helpers = workers - 1;
  thread_pool().run(job);
}

Scratch::Scratch(size_t bytes) : ptr_(nullptr), cap_(0) {
  if (bytes == 0) bytes = 64;
  {
    std::lock_guard<std::mutex> lock(g_scratch_mutex);
    size_t best = g_scratch_cache.size();
    for (size_t i = 0; i < g_scratch_cache.size(); ++i)
      if (g_scratch_cache[i].second >= bytes && (best == g_scratch_cache.size() || g_scratch_cache[i].second < g_scratch_cache[best].second)) best = i;
    if (best < g_scratch_cache.size()) {
      ptr_ = g_scratch_cache[best].first;
      cap_ = g_scratch_cache[best].second;
      g_scratch_cache.erase(g_scratch_cache.begin() + best);
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
  std::lock_guard<std::mutex> lock(g_scratch_mutex);
  if (g_scratch_cache.size() >= kPoolSlots) {
    // Drop the smallest cached buffer (or this one) to bound what the pool keeps.
    size_t smallest = 0;
    for (size_t i = 1; i < g_scratch_cache.size(); ++i)
      if (g_scratch_cache[i].second < g_scratch_cache[smallest].second) smallest = i;
    if (g_scratch_cache[smallest].second < cap_) {
      std::free(g_scratch_cache[smallest].first);
      g_scratch_cache[smallest] = {ptr_, cap_};
    } else {
      std::free(ptr_);
    }
    return;
  }
  g_scratch_cache.emplace_back(ptr_, cap_);
}

}  // namespace nrcore
