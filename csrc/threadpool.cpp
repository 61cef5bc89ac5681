#include "fedagg/threadpool.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <pthread.h>
#include <thread>
#include <vector>

namespace fedagg {
namespace {

int default_threads() {
  if (const char* env = std::getenv("FEDAGG_NUM_THREADS")) {
    int v = std::atoi(env);
    if (v > 0) return v;
  }
  unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}

class Pool {
 public:
  Pool() { resize(default_threads()); }
  ~Pool() { stop_workers(); }

  int size() {
    std::lock_guard<std::mutex> call(call_mu_);
    return nthreads_;
  }

  void resize(int n) {
    std::lock_guard<std::mutex> call(call_mu_);
    stop_workers();
    nthreads_ = std::max(1, n);
    stop_ = false;
    // New workers answer only runs started after they exist: a worker that took the
    // current generation for new work would run a finished batch and miscount active_
    // (a lost wakeup: the caller then waits forever).
    const std::size_t gen = generation_;
    for (int w = 1; w < nthreads_; ++w) workers_.emplace_back([this, w, gen] { worker_loop(w, gen); });
  }

  void run(std::size_t ntasks, const TaskFn& fn) {
    if (ntasks == 0) return;
    std::lock_guard<std::mutex> call(call_mu_);
    if (nthreads_ == 1 || ntasks == 1) {
      for (std::size_t t = 0; t < ntasks; ++t) fn(t, 0);
      return;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      ntasks_ = ntasks;
      next_.store(0);
      error_ = nullptr;
      active_ = nthreads_ - 1;
      ++generation_;
    }
    cv_.notify_all();
    work(0);
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return active_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void work(int worker) {
    for (;;) {
      std::size_t t = next_.fetch_add(1);
      if (t >= ntasks_) break;
      try {
        (*fn_)(t, worker);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!error_) error_ = std::current_exception();
        next_.store(ntasks_);  // stop handing out tasks
      }
    }
  }

  void worker_loop(int worker, std::size_t seen) {
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      work(worker);
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (--active_ == 0) done_cv_.notify_one();
      }
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::mutex call_mu_;  // one parallel_for (or resize) at a time
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  int nthreads_ = 1;
  bool stop_ = false;
  std::size_t generation_ = 0;
  const TaskFn* fn_ = nullptr;
  std::size_t ntasks_ = 0;
  std::atomic<std::size_t> next_{0};
  int active_ = 0;
  std::exception_ptr error_;
};

// Leaked on purpose: no join at interpreter teardown. After fork() the child
// has none of the parent's worker threads, so it drops (leaks) the parent's
// pool and builds its own on first use instead of waiting on dead workers.
std::atomic<Pool*> g_pool{nullptr};

void forget_pool_in_child() { g_pool.store(nullptr); }

Pool& pool() {
  Pool* p = g_pool.load();
  if (p == nullptr) {
    static std::once_flag registered;
    std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, forget_pool_in_child); });
    Pool* fresh = new Pool();
    if (g_pool.compare_exchange_strong(p, fresh)) p = fresh;
    else delete fresh;
  }
  return *p;
}

}  // namespace

int num_threads() { return pool().size(); }
void set_num_threads(int n) { pool().resize(n <= 0 ? default_threads() : n); }
void parallel_for(std::size_t ntasks, const TaskFn& fn) { pool().run(ntasks, fn); }

}  // namespace fedagg
