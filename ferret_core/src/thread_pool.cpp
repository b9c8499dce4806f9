#include "thread_pool.hpp"

#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace ferret::detail {
namespace {

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    start_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(int64_t n_tasks, int n_threads, const std::function<void(int64_t)>& fn) {
    std::lock_guard<std::mutex> one_job_at_a_time(run_mutex_);
    const int helpers = int(std::min<int64_t>(n_threads, n_tasks)) - 1;
    while (int(workers_.size()) < helpers) {
      const int id = int(workers_.size());
      workers_.emplace_back([this, id] { work(id); });
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      n_tasks_ = n_tasks;
      next_.store(0);
      helpers_ = helpers;
      pending_ = helpers;
      generation_++;
    }
    start_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
  }

 private:
  void drain() {
    for (int64_t i = next_.fetch_add(1); i < n_tasks_; i = next_.fetch_add(1)) (*fn_)(i);
  }

  void work(int id) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        start_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (id >= helpers_) continue;
      }
      drain();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        pending_--;
      }
      done_.notify_one();
    }
  }

  std::mutex run_mutex_, mutex_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_{0};
  int helpers_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

}  // namespace

void parallel_for(int64_t n_tasks, int n_threads, const std::function<void(int64_t)>& fn) {
  if (n_tasks <= 0) return;
  if (n_threads <= 1 || n_tasks == 1) {
    for (int64_t i = 0; i < n_tasks; i++) fn(i);
    return;
  }
  // A forked child inherits the pool's memory but not its threads: it builds its own (the
  // parent's pool object is leaked there on purpose; joining foreign threads would hang).
  static std::mutex guard;
  static Pool* pool = nullptr;
  static pid_t owner = 0;
  Pool* p;
  {
    std::lock_guard<std::mutex> lock(guard);
    if (pool == nullptr || owner != getpid()) {
      pool = new Pool();
      owner = getpid();
    }
    p = pool;
  }
  p->run(n_tasks, n_threads, fn);
}

}  // namespace ferret::detail
