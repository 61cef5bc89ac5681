// A small persistent thread pool. Kernels split the coordinate axis into tasks;
// the calling thread works too. One parallel_for runs at a time (callers from
// several Python threads are serialized), and exceptions thrown by a task are
// rethrown in the caller.
#pragma once
#include <cstddef>
#include <functional>

namespace fedagg {

// fn(task_index, worker_index); worker_index < num_threads().
using TaskFn = std::function<void(std::size_t, int)>;

int num_threads();
void set_num_threads(int n);  // n <= 0: hardware concurrency (or FEDAGG_NUM_THREADS)
void parallel_for(std::size_t ntasks, const TaskFn& fn);

}  // namespace fedagg
