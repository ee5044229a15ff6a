// A second thread for the CPU decode kernel's matrix-vector products, which the
// calling thread never waits on for long.
//
// On a small machine the executor runs a small decode step on one thread fewer
// than there are cores, leaving a core to the rest of the mesh (scheduler,
// router, gateway, clients), whose work arrives at every token. An OpenMP team
// on every core loses to that: when a member is preempted in the middle of a
// phase, the others wait at the next barrier for as long as the preempting
// process runs. Here the owner (the thread calling the kernel) computes the first
// half of a product's 16-row blocks and a helper thread the second half, from
// its start, claiming each block in the block's own state word. When its half
// is done the owner takes back, from the end, the blocks the helper has not
// reached; it waits only a few block-times for a block the helper is computing,
// and past that takes it too. A block is 16 rows x up to 8 sequences, so
// computing one twice costs nothing but time; the helper publishes its result
// only after winning the block's state word, so a helper that resumes late
// throws its work away instead of writing over a later step. The helper runs
// under SCHED_IDLE: any other thread that wants its core gets it at once (the
// owner then takes the blocks back), so it uses only time no one else wants.
//
// Everything the helper reads (the jobs' weights, inputs and outputs) stays
// allocated for the kernel's life, so a stale helper reads valid memory. Each
// job is tagged (a generation, the job's index, its row count) where it is
// published and in every block's state word, so no stale claim can succeed. The helper
// spins while jobs come (between the phases of a forward) and sleeps on a
// futex after SPIN_NS without one (between steps).
#pragma once

#include <immintrin.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

namespace llmesh_share {

// One matrix-vector product: y[b * rows + o] for the rows o of a block, from x[b]
struct Job {
  const uint16_t *w, *bias, *x;
  int in, rows;
  float* y;
};

// computes block k of `job` for B rows into y (the block's row 0), rows ldy apart
typedef void (*BlockFn)(const Job& job, int B, int k, float* y, int ldy);

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

class Sharer {
 public:
  static constexpr int64_t SPIN_NS = 30000;  // idle spinning before the helper sleeps
  enum : uint64_t { FREE = 0, TAKEN = 1, WRITING = 2, DONE = 3, ABANDONED = 4 };

  Sharer(const std::vector<Job>* jobs, BlockFn fn) : jobs_(jobs), fn_(fn) {
    int most = 1;
    for (const Job& j : *jobs) most = blocks(j) > most ? blocks(j) : most;
    states_.reset(new std::atomic<uint64_t>[most]);
    for (int i = 0; i < most; ++i) states_[i].store(0);
    thread_ = std::thread([this] { helper(); });
  }

  ~Sharer() {
    stop_.store(true);
    wake_.fetch_add(1);
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&wake_), FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
    thread_.join();
  }

  // every block of job j for B rows (1..15): the first half by this thread, the second
  // by the helper from its start, this thread taking back from the end what the helper
  // has not reached when its own half is done
  void run(int j, int B) {
    const Job& job = (*jobs_)[j];
    const int n = blocks(job), h0 = n - n / 2;
    gen_ = (gen_ + 1) & ((1u << 28) - 1);
    if (gen_ == 0) gen_ = 1;
    const uint64_t tag = (static_cast<uint64_t>(gen_) << 16) | (static_cast<uint64_t>(j) << 4) | B;
    counter_.store((tag << 16) | h0);  // (seq_cst: ordered before the sleeping check)
    if (sleeping_.load()) {
      wake_.fetch_add(1);
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&wake_), FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
    }
    const int64_t t0 = now_ns();
    for (int k = 0; k < h0; ++k) fn_(job, B, k, job.y + 16 * k, job.rows);
    // a block the helper is computing: a few of our block-times for it, then it is ours
    const int64_t budget = 3 * (now_ns() - t0) / (h0 ? h0 : 1) + 2000;
    for (int k = n - 1; k >= h0; --k) settle(job, B, k, tag, budget);
  }

  uint64_t helper_blocks() const { return helper_blocks_.load(std::memory_order_relaxed); }
  uint64_t taken_back() const { return taken_back_.load(std::memory_order_relaxed); }

 private:
  static int blocks(const Job& j) { return (j.rows + 15) / 16; }

  void settle(const Job& job, int B, int k, uint64_t tag, int64_t budget) {
    int64_t t0 = 0;
    for (;;) {
      uint64_t s = states_[k].load(std::memory_order_acquire);
      const bool current = (s >> 3) == tag;
      if (current && (s & 7) == DONE) return;
      if (current && (s & 7) == WRITING) {  // (16 x B floats being stored)
        _mm_pause();
        continue;
      }
      if (current && (s & 7) == TAKEN) {  // being computed: wait a little
        if (t0 == 0) t0 = now_ns();
        if (now_ns() - t0 < budget) {
          _mm_pause();
          continue;
        }
      }
      if (states_[k].compare_exchange_strong(s, (tag << 3) | ABANDONED, std::memory_order_acq_rel)) {
        fn_(job, B, k, job.y + 16 * k, job.rows);
        taken_back_.fetch_add(1, std::memory_order_relaxed);
        return;
      }
    }
  }

  // the helper's part of one job: blocks from h0 up until one is taken back (the owner
  // takes back from the end, so every block above it is the owner's too)
  void help(uint64_t v) {
    const uint64_t tag = v >> 16;
    const int h0 = static_cast<int>(v & 0xffff), j = static_cast<int>((tag >> 4) & 0xfff);
    const int B = static_cast<int>(tag & 15);
    if (B == 0 || j >= static_cast<int>(jobs_->size())) return;
    const Job& job = (*jobs_)[j];
    float local[16 * 15];
    for (int k = h0; k < blocks(job); ++k) {
      uint64_t s = states_[k].load(std::memory_order_acquire);
      if ((s >> 3) == tag || !states_[k].compare_exchange_strong(s, (tag << 3) | TAKEN, std::memory_order_acq_rel))
        return;
      fn_(job, B, k, local, 16);
      uint64_t taken = (tag << 3) | TAKEN;
      if (!states_[k].compare_exchange_strong(taken, (tag << 3) | WRITING, std::memory_order_acq_rel))
        return;  // taken back while we computed: ours is thrown away
      const int live = job.rows - 16 * k < 16 ? job.rows - 16 * k : 16;
      const __mmask16 mask = static_cast<__mmask16>((1u << live) - 1);
      for (int b = 0; b < B; ++b)
        _mm512_mask_storeu_ps(job.y + static_cast<size_t>(b) * job.rows + 16 * k, mask,
                              _mm512_loadu_ps(local + 16 * b));
      states_[k].store((tag << 3) | DONE, std::memory_order_release);
      helper_blocks_.fetch_add(1, std::memory_order_relaxed);
    }
  }

  void helper() {
    // below every other thread: the core is lent, never taken from the mesh's processes
    sched_param none{};
    none.sched_priority = 0;
    pthread_setschedparam(pthread_self(), SCHED_IDLE, &none);
    uint64_t last = 0;
    int64_t idle_since = now_ns();
    while (!stop_.load(std::memory_order_relaxed)) {
      const uint64_t v = counter_.load(std::memory_order_acquire);
      if (v != last) {
        last = v;
        help(v);
        idle_since = now_ns();
        continue;
      }
      if (now_ns() - idle_since < SPIN_NS) {
        _mm_pause();
        continue;
      }
      const uint32_t w = wake_.load();
      sleeping_.store(true);
      if (counter_.load() == v && !stop_.load())
        syscall(SYS_futex, reinterpret_cast<uint32_t*>(&wake_), FUTEX_WAIT_PRIVATE, w, nullptr, nullptr, 0);
      sleeping_.store(false);
      idle_since = now_ns();
    }
  }

  const std::vector<Job>* jobs_;
  BlockFn fn_;
  std::unique_ptr<std::atomic<uint64_t>[]> states_;
  uint32_t gen_ = 0;
  alignas(64) std::atomic<uint64_t> counter_{0};
  alignas(64) std::atomic<uint32_t> wake_{0};
  std::atomic<bool> sleeping_{false}, stop_{false};
  std::atomic<uint64_t> helper_blocks_{0}, taken_back_{0};
  std::thread thread_;
};

}  // namespace llmesh_share
