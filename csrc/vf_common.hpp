// Veilface native kernels: shared pieces (types, top-k heap, CPU detection, threading).
// Header-only C++17. Knows nothing about Python.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <unistd.h>
#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

// Target regions: the functions between VF_TARGET_BEGIN("isa,list") and VF_TARGET_END are compiled
// for those instruction sets (used only after run-time CPU detection). Warnings about undefined
// vectors are off inside: GCC's masked AVX-512 intrinsics start from one on purpose.
#define VF_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define VF_TARGET_BEGIN(isa) VF_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define VF_TARGET_END VF_PRAGMA(clang attribute pop)
#else
#define VF_TARGET_BEGIN(isa)                                      \
    VF_PRAGMA(GCC push_options)                                   \
    VF_PRAGMA(GCC diagnostic push)                                \
    VF_PRAGMA(GCC diagnostic ignored "-Wmaybe-uninitialized")     \
    VF_PRAGMA(GCC diagnostic ignored "-Wuninitialized")           \
    VF_PRAGMA(GCC target(isa))
#define VF_TARGET_END VF_PRAGMA(GCC pop_options) VF_PRAGMA(GCC diagnostic pop)
#endif

namespace vf {

using i64 = std::int64_t;
using u64 = std::uint64_t;

// Upper bounds enforced at the boundary; exported to Python as engine._kernels.MAX_INT8_DIM /
// MAX_IOM_M (engine/kernels.py reads them from there).
constexpr i64 kMaxInt8Dim = 65536;   // 255*128*dim must fit int32 in the VNNI path
constexpr i64 kMaxIomM = 16320;      // 255 chunks of 64 bytes: per-byte counters must not wrap
constexpr int kQB = 4;               // max queries per register block
constexpr i64 kPrefetchBytes = 4096; // software prefetch distance of the SIMD skeletons

// The one query-block dispatch: calls f(std::integral_constant<int, QB>{}) for qb in [1, kQB].
// Use with a generic lambda: with_qb(qb, [&](auto QB) { kernel<decltype(QB)::value>(...); });
template <class F>
inline void with_qb(int qb, F&& f) {
    static_assert(kQB == 4, "with_qb covers query blocks of 1..4");
    switch (qb) {
        case 4: f(std::integral_constant<int, 4>{}); break;
        case 3: f(std::integral_constant<int, 3>{}); break;
        case 2: f(std::integral_constant<int, 2>{}); break;
        default: f(std::integral_constant<int, 1>{}); break;
    }
}

// ---------------------------------------------------------------------------------------------
// Top-k: bounded heap keeping the k best (score, index) pairs. "Better" = larger score when
// Largest, smaller otherwise; ties broken by the smaller index. The root is the worst kept
// element, so a new candidate only has to beat the root.
template <class T, bool Largest>
struct TopK {
    i64 k = 0;
    i64 size = 0;
    T thr{};                 // score of the worst kept element (valid when full())
    std::vector<T> s;
    std::vector<i64> id;

    TopK() = default;
    explicit TopK(i64 k_) : k(k_), s(static_cast<size_t>(k_)), id(static_cast<size_t>(k_)) {}

    static inline bool better(T a, i64 ia, T b, i64 ib) {
        if (Largest) {
            if (a > b) return true;
            if (b > a) return false;
        } else {
            if (a < b) return true;
            if (b < a) return false;
        }
        return ia < ib;
    }
    // strictly better by score alone (used by the vector filters; indices only grow)
    static inline bool beats(T a, T thr_) { return Largest ? (a > thr_) : (a < thr_); }

    bool full() const { return size == k; }

    void push(T v, i64 i) {
        if (size < k) {
            i64 c = size++;
            while (c > 0) {  // sift up: parent must be worse than child
                i64 p = (c - 1) >> 1;
                if (better(s[p], id[p], v, i)) { s[c] = s[p]; id[c] = id[p]; c = p; }
                else break;
            }
            s[c] = v; id[c] = i;
            if (size == k) thr = s[0];
        } else if (better(v, i, s[0], id[0])) {
            i64 c = 0;
            for (;;) {  // sift down the hole from the root
                i64 l = 2 * c + 1;
                if (l >= k) break;
                i64 w = l;  // worse child
                i64 r = l + 1;
                if (r < k && better(s[l], id[l], s[r], id[r])) w = r;
                if (better(v, i, s[w], id[w])) { s[c] = s[w]; id[c] = id[w]; c = w; }
                else break;
            }
            s[c] = v; id[c] = i;
            thr = s[0];
        }
    }
};

// Merge several heaps (one per thread) for one query into the best-first output row.
template <class T, bool Largest>
void merge_topk(const std::vector<const TopK<T, Largest>*>& parts, i64 k, T* out_s, i64* out_i) {
    std::vector<std::pair<T, i64>> all;
    size_t total = 0;
    for (auto* p : parts) total += static_cast<size_t>(p->size);
    all.reserve(total);
    for (auto* p : parts)
        for (i64 t = 0; t < p->size; ++t) all.emplace_back(p->s[t], p->id[t]);
    auto cmp = [](const std::pair<T, i64>& a, const std::pair<T, i64>& b) {
        return TopK<T, Largest>::better(a.first, a.second, b.first, b.second);
    };
    i64 kk = std::min<i64>(k, static_cast<i64>(all.size()));
    std::partial_sort(all.begin(), all.begin() + kk, all.end(), cmp);
    for (i64 t = 0; t < kk; ++t) { out_s[t] = all[t].first; out_i[t] = all[t].second; }
}

// ---------------------------------------------------------------------------------------------
// SIMD levels and run-time CPU detection.
enum class Simd : int { Scalar = 0, AVX2 = 1, AVX512 = 2 };

inline const char* simd_name(Simd s) {
    switch (s) {
        case Simd::AVX512: return "avx512";
        case Simd::AVX2: return "avx2";
        default: return "scalar";
    }
}

inline bool cpu_has_popcnt() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("popcnt");
#else
    return false;
#endif
}

inline bool cpu_supports(Simd s) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    switch (s) {
        case Simd::Scalar: return true;
        case Simd::AVX2:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                   __builtin_cpu_supports("popcnt");
        case Simd::AVX512:
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                   __builtin_cpu_supports("avx512vpopcntdq") &&
                   __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("popcnt");
    }
    return false;
#else
    return s == Simd::Scalar;
#endif
}

inline Simd best_simd() {
    if (cpu_supports(Simd::AVX512)) return Simd::AVX512;
    if (cpu_supports(Simd::AVX2)) return Simd::AVX2;
    return Simd::Scalar;
}

inline bool parse_simd(const std::string& name, Simd* out) {
    if (name == "scalar") { *out = Simd::Scalar; return true; }
    if (name == "avx2") { *out = Simd::AVX2; return true; }
    if (name == "avx512") { *out = Simd::AVX512; return true; }
    return false;
}

// The forced level (-1 = auto). Initialised from VEILFACE_SIMD; changed by set_simd().
inline std::atomic<int>& forced_simd() {
    static std::atomic<int> v{[] {
        const char* e = std::getenv("VEILFACE_SIMD");
        Simd s;
        if (e && parse_simd(e, &s) && cpu_supports(s)) return static_cast<int>(s);
        return -1;
    }()};
    return v;
}

inline Simd current_simd() {
    int f = forced_simd().load(std::memory_order_relaxed);
    if (f >= 0) return static_cast<Simd>(f);
    static const Simd best = best_simd();
    return best;
}

// ---------------------------------------------------------------------------------------------
// Threading: run fn(t) for t in [0, T) on T threads (the caller runs t = 0).
inline int resolve_threads(int requested) {
    int hw = static_cast<int>(std::thread::hardware_concurrency());
    if (hw <= 0) hw = 1;
    if (requested <= 0) return hw;
    return std::min(requested, 256);
}

// A small persistent worker pool (spawning std::threads costs ~50-100 us per call, which is
// a large share of a 1 ms search). Calls from several Python threads at once are safe: a call
// that finds the pool busy spawns its own threads instead. After fork() the child gets a new
// pool (the parent's workers do not exist there); the old one is leaked on purpose.
class WorkerPool {
  public:
    static WorkerPool* instance() {
        static std::mutex mu;
        static WorkerPool* pool = nullptr;
        std::lock_guard<std::mutex> g(mu);
        if (pool == nullptr || pool->pid_ != ::getpid()) pool = new WorkerPool();  // leak old
        return pool;
    }
    std::mutex busy;

    // Runs job(t) for every t in [0, T): the caller runs t = 0, idle workers claim the other
    // slots, and slots no worker has claimed by the time the caller is done are run by the
    // caller itself -- so a worker that is slow to wake up (an idle vCPU, a busy machine) never
    // holds a call up. busy must be held.
    void run(int T, const std::function<void(int)>& job) {
        {
            std::unique_lock<std::mutex> lk(m_);
            while (static_cast<int>(workers_.size()) < T - 1) {
                const std::uint64_t g = gen_;  // the worker must see the ++gen_ below as new
                workers_.emplace_back([this, g] { loop(g); });
#if defined(__linux__)
                handles_.push_back(workers_.back().native_handle());
                caller_cpu_ = -1;  // new worker: (re)apply the affinity below
#endif
                workers_.back().detach();
            }
            steer_off_caller_cpu();
            job_ = &job;
            next_ = 1;
            end_ = T;
            running_ = 0;
            ++gen_;
        }
        cv_.notify_all();
        std::exception_ptr err;
        try { job(0); } catch (...) { err = std::current_exception(); }
        for (;;) {  // run unclaimed slots here
            int t;
            {
                std::lock_guard<std::mutex> lk(m_);
                if (next_ >= end_) break;
                t = next_++;
            }
            try { job(t); } catch (...) { if (!err) err = std::current_exception(); }
        }
        std::unique_lock<std::mutex> lk(m_);
        done_.wait(lk, [this] { return running_ == 0; });
        job_ = nullptr;
        if (!err) err = err_;
        err_ = nullptr;
        lk.unlock();
        if (err) std::rethrow_exception(err);
    }

  private:
    WorkerPool() : pid_(::getpid()) {}

    // Keep the workers off the caller's CPU. Linux wakes a thread on the waker's CPU when the
    // other CPUs look busy, and under KVM an idle (halted) vCPU looks busy (preempted): after
    // the caller has been idle for a few ms, a woken worker lands on the caller's vCPU and the
    // two time-share one core (measured: a 2-thread 32 MB scan takes as long as 1 thread).
    // The workers' mask is the caller's mask minus the caller's current CPU; it is only
    // rewritten when the caller's CPU changes (a cheap rdpid/vDSO read otherwise). m_ held.
    void steer_off_caller_cpu() {
#if defined(__linux__) && defined(CPU_SETSIZE)
        const int cpu = ::sched_getcpu();
        if (cpu < 0 || cpu >= CPU_SETSIZE || cpu == caller_cpu_ || handles_.empty()) return;
        cpu_set_t mask;
        CPU_ZERO(&mask);
        if (::sched_getaffinity(0, sizeof(mask), &mask) != 0) return;
        CPU_CLR(cpu, &mask);
        // caller pinned to one CPU: leave the workers alone (and look again next call)
        if (CPU_COUNT(&mask) == 0) { caller_cpu_ = -1; return; }
        for (pthread_t h : handles_) ::pthread_setaffinity_np(h, sizeof(mask), &mask);
        caller_cpu_ = cpu;
#endif
    }
    void loop(std::uint64_t seen) {
        for (;;) {
            const std::function<void(int)>* job = nullptr;
            int t = 0;
            {
                std::unique_lock<std::mutex> lk(m_);
                cv_.wait(lk, [&] { return gen_ != seen; });
                seen = gen_;
                if (job_ != nullptr && next_ < end_) {
                    t = next_++;
                    ++running_;
                    job = job_;
                }
            }
            if (!job) continue;
            std::exception_ptr err;
            try { (*job)(t); } catch (...) { err = std::current_exception(); }
            std::lock_guard<std::mutex> lk(m_);
            if (err && !err_) err_ = err;
            if (--running_ == 0) done_.notify_one();
        }
    }
    pid_t pid_;
    std::mutex m_;
    std::condition_variable cv_, done_;
    std::vector<std::thread> workers_;
#if defined(__linux__)
    std::vector<pthread_t> handles_;  // the (detached, never-exiting) workers
    int caller_cpu_ = -1;             // caller CPU the workers' affinity was last set for
#endif
    const std::function<void(int)>* job_ = nullptr;
    std::uint64_t gen_ = 0;
    int next_ = 0;     // next unclaimed slot of the current job
    int end_ = 0;      // slots of the current job
    int running_ = 0;  // slots being run by workers
    std::exception_ptr err_;
};

template <class F>
void parallel_run(int T, F&& fn) {
    if (T <= 1) { fn(0); return; }
    std::function<void(int)> job = [&fn](int t) { fn(t); };
    WorkerPool* pool = WorkerPool::instance();
    std::unique_lock<std::mutex> lk(pool->busy, std::try_to_lock);
    if (lk.owns_lock()) { pool->run(T, job); return; }
    std::vector<std::thread> threads;  // pool in use by another call: private threads
    threads.reserve(static_cast<size_t>(T - 1));
    for (int t = 1; t < T; ++t) threads.emplace_back([&fn, t] { fn(t); });
    fn(0);
    for (auto& th : threads) th.join();
}

// Rows per tile so that a tile of the gallery stays in L2 while all query blocks use it.
inline i64 tile_rows(i64 row_bytes) {
    i64 r = (i64(1) << 16) / std::max<i64>(row_bytes, 1);
    r = std::max<i64>(16, std::min<i64>(2048, r));
    return (r + 7) & ~i64(7);
}

}  // namespace vf
