// A small persistent pool of std::threads (no OpenMP: torch brings its own runtime, and two in
// one process fight). run() hands out task indices 0..n-1; the caller works too.
#pragma once

#include <cstdint>
#include <functional>

namespace ferret::detail {

// Runs fn(i) for i in [0, n_tasks) on up to n_threads threads; returns when all are done.
void parallel_for(int64_t n_tasks, int n_threads, const std::function<void(int64_t)>& fn);

}  // namespace ferret::detail
