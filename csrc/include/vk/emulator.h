// vk/emulator.h: the host emulation of CUDA thread blocks behind vk/port.h (VK_EMULATE builds only).
// Read the summary at the top of port.h first. Layout of this file:
//   1. CUDA's host-visible vocabulary (qualifiers, dim3, vector types, math intrinsics)
//   2. fibers: stacks and the context switch
//   3. the block scheduler: settings (schedule, race checker), cp.async groups, the shared-memory
//      shadow (race checker), barriers, warp collectives, launch
//   4. the CUDA intrinsics built on it (__syncthreads, shuffles, votes, atomics)
//   5. namespace vk: 16-bit types, mma, ldmatrix, cp.async, ld_shared / st_shared, VK_LAUNCH
#pragma once
#ifndef VK_EMULATE
#error "vk/emulator.h is the host emulation; include vk/port.h"
#endif

#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// ------------------------------------------------------------------ 1. CUDA vocabulary on the host
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__    __attribute__((noinline))
#define __align__(n)    __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __shared__   thread_local
#define __constant__ static
#define __ldg(p)     (*(p))

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __attribute__((aligned(8))) float2 {
  float x, y;
};
struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};
struct __attribute__((aligned(8))) uint2 {
  unsigned x, y;
};
struct __attribute__((aligned(16))) uint4 {
  unsigned x, y, z, w;
};
struct __attribute__((aligned(8))) int2 {
  int x, y;
};
struct __attribute__((aligned(16))) int4 {
  int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

constexpr int warpSize = 32;
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline float __uint_as_float(unsigned i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }

namespace vk {
using stream_t = void*;  // ignored by the emulator
inline void check_launch(const char*) {}

namespace emu {

// ------------------------------------------------------------------ 2. fibers
#if defined(__x86_64__)
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the
// stack pointer in *save and continues on the stack `to` (System V AMD64 ABI).
extern "C" __attribute__((naked, noinline, noipa)) inline void vk_emu_switch(void** save, void* to) {
  asm volatile(
      "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
      "subq $8, %rsp\n\tstmxcsr (%rsp)\n\tfnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\tfldcw 4(%rsp)\n\taddq $8, %rsp\n\t"
      "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret\n\t");
}

// Every context switch goes through here; the compiler barrier makes the compiler reload memory
// (shared memory, threadIdx) that other fibers may have changed while this one was switched out.
inline void switch_stack(void** save, void* to) {
  vk_emu_switch(save, to);
  asm volatile("" ::: "memory");
}
#endif

struct Stack {
  char* base = nullptr;  // lowest address (a guard page)
  size_t size = 0;
};

constexpr size_t kStackBytes = 256 * 1024;  // per emulated thread; touched pages only

inline Stack new_stack() {
  size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  size_t size = kStackBytes + page;
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("vk emulator: cannot map a fiber stack");
  mprotect(p, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
  return {static_cast<char*>(p), size};
}

// ------------------------------------------------------------------ 3. the block scheduler
enum class State : uint8_t { run, barrier, warp, done };
enum class Op : uint8_t { none, syncwarp, shfl, vote, mma_f16, mma_bf16, ldsm };

// How blocks run. vk::emu::settings() holds them; VK_EMU_SCHEDULE (a schedule name, "random:SEED" for a
// seed) and VK_EMU_RACECHECK (0 or 1) give the defaults. Schedules:
//   round_robin          threads 0..n-1 in turn, each to its next sync point: warps in lock-step
//   reverse              threads n-1..0 in turn
//   warp_major           warp 0 runs as far as it can (to a __syncthreads it waits at, or its end), then
//                        warp 1, ...: warps run whole barrier intervals out of step with each other
//   warp_major_reverse   the same from the last warp, lanes from the last
//   random               warp-major, warps and lanes in a fresh random order (seeded) at every pass
enum class Schedule : uint8_t { round_robin, reverse, warp_major, warp_major_reverse, random };
constexpr const char* kScheduleNames[] = {"round_robin", "reverse", "warp_major", "warp_major_reverse", "random"};

struct Settings {
  Schedule schedule = Schedule::round_robin;
  uint64_t seed = 1;      // random schedule
  bool racecheck = true;  // shadow shared memory and report hazards (see shadow_access)
};

inline Schedule parse_schedule(const std::string& name) {
  for (int i = 0; i < 5; ++i)
    if (name == kScheduleNames[i]) return Schedule(i);
  throw std::runtime_error(
      "vk emulator: schedule: expected one of round_robin, reverse, warp_major, "
      "warp_major_reverse, random, got '" +
      name + "'");
}

inline Settings settings_from_env() {
  Settings s;
  if (const char* e = std::getenv("VK_EMU_SCHEDULE"); e && *e) {
    std::string v(e);
    const size_t colon = v.find(':');
    if (colon != std::string::npos) {
      s.seed = std::strtoull(v.c_str() + colon + 1, nullptr, 10);
      v.resize(colon);
    }
    s.schedule = parse_schedule(v);
  }
  if (const char* e = std::getenv("VK_EMU_RACECHECK"); e && *e) s.racecheck = std::string(e) != "0";
  return s;
}

// The settings every launch copies when it starts (set them between launches, not during one).
inline Settings& settings() {
  static Settings s = settings_from_env();
  return s;
}

// ---- cp.async: a copy is recorded at issue (its destination poisoned with 0xFF bytes) and done when a
// cp.async.wait_group of the issuing thread covers its commit group (PTX: wait_group N waits for all
// but the newest N committed groups; copies not yet committed are not waited for). Copies still
// pending when their thread exits land then.
struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;
  bool pred;  // false: zero-fill
  int group;  // commit group number of the thread, -1 while not committed
  std::source_location loc;
};

// ---- the race checker's shadow of dynamic shared memory: one cell per 2 bytes. Barrier intervals are
// numbered (an "epoch" bumps at every __syncthreads release and block start); per warp, __syncwarp
// intervals likewise. Two accesses by different threads to one cell conflict when one is a write and
// both fall in the same barrier interval, and, for two lanes of one warp, in the same __syncwarp interval.
enum class Access : uint8_t { read, write, async_write };
enum : uint8_t { kPending = 1, kManyReaders = 2 };
struct Cell {
  std::source_location w_loc, r_loc;  // the last write; the first read of the reads kept
  uint32_t w_epoch = 0, r_epoch = 0;  // barrier interval of that write / read (0: none)
  uint16_t w_thread = 0, r_thread = 0;
  uint16_t w_wepoch = 0, r_wepoch = 0;  // __syncwarp interval of the writer's / reader's warp
  uint8_t flags = 0;                    // kPending: the write is a cp.async not landed yet
};
struct HazardKey {
  const char* kind;
  const char* now_file;
  unsigned now_line;
  const char* prev_file;
  unsigned prev_line;
  bool operator==(const HazardKey&) const = default;
};

// What one lane puts into / gets out of a warp collective.
struct LaneIn {
  Op op;
  uint8_t arg;    // ldmatrix: count | trans << 4
  uint32_t mask;  // shuffles/votes: the caller's mask
  int src;        // shuffles: the source lane (or -1: own value)
  uint64_t v[5];  // shuffle value / vote predicate / mma a,b,c / ldmatrix pointer
};
struct LaneOut {
  uint64_t v[2];
};

struct Warp {
  int live = 0;     // lanes that exist and have not exited
  int arrived = 0;  // lanes waiting in the current collective
  uint32_t present = 0;
  LaneIn in[32];
  LaneOut out[32];
};

struct Fiber {
  void* sp = nullptr;
  State state = State::run;
};

struct Block {
  const char* kernel = "";
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  int nthreads = 0;
  int live = 0;
  int at_barrier = 0;
  int cur = -1;
  void* sched_sp = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::string error;
  unsigned char* dyn_smem = nullptr;
  size_t dyn_smem_bytes = 0;
  Settings settings;
  uint64_t rng = 0;                           // random schedule
  std::vector<std::vector<AsyncCopy>> async;  // per thread: cp.async copies not landed yet
  std::vector<int> committed;                 // per thread: commit groups so far
  // race checker (settings.racecheck)
  Cell* shadow = nullptr;
  std::vector<uint16_t> warp_epoch;    // per warp: __syncwarp intervals
  size_t hazards = 0;                  // hazards seen in this block
  std::vector<HazardKey> hazard_keys;  // distinct (kind, lines) reported
  std::vector<std::string> hazard_text;
#if !defined(__x86_64__)
  std::vector<ucontext_t> uctx;
  ucontext_t sched_uctx;
#endif
};

struct ThreadState {
  Block* block = nullptr;
  std::vector<Stack> stacks;
  std::vector<unsigned char> dyn_smem;
  std::vector<Cell> shadow;  // race checker: one cell per 2 bytes of dyn_smem
  uint32_t epoch = 1;        // the current barrier interval (never reused on this CPU thread)
};
inline thread_local ThreadState tls;

inline Block& blk() { return *tls.block; }

// Switch from the running fiber back to the scheduler.
inline void yield() {
  Block& b = blk();
#if defined(__x86_64__)
  switch_stack(&b.fibers[b.cur].sp, b.sched_sp);
#else
  swapcontext(&b.uctx[b.cur], &b.sched_uctx);
  asm volatile("" ::: "memory");
#endif
}

// Stop the launch with an error (called on a fiber; never returns).
[[noreturn]] inline void fail(const std::string& msg) {
  Block& b = blk();
  if (b.error.empty()) b.error = msg;
  b.fibers[b.cur].state = State::done;
  for (;;) yield();  // the scheduler sees the error and never resumes this fiber
}

inline int lane() { return blk().cur & 31; }
inline Warp& my_warp() { return blk().warps[blk().cur >> 5]; }

inline void release_barrier(Block& b) {
  for (auto& f : b.fibers)
    if (f.state == State::barrier) f.state = State::run;
  b.at_barrier = 0;
  ++tls.epoch;
}

// ------------------------------------------------------------------ 3b. the race checker
inline std::string where(const std::source_location& l) {
  const char* f = l.file_name();
  const char* slash = std::strrchr(f, '/');
  return std::string(slash ? slash + 1 : f) + ":" + std::to_string(l.line());
}
inline std::string who(int t) {
  return t < 0 ? std::string("more than one other thread")
               : "thread " + std::to_string(t) + " (warp " + std::to_string(t >> 5) + ")";
}

inline void report(Block& b, const char* kind, const std::source_location& now, int now_t, const char* now_does,
                   const std::source_location& prev, int prev_t, const char* prev_did, size_t offset) {
  ++b.hazards;
  const HazardKey key{kind, now.file_name(), now.line(), prev.file_name(), prev.line()};
  for (const auto& k : b.hazard_keys)
    if (k == key) return;
  if (b.hazard_keys.size() >= 16) return;
  b.hazard_keys.push_back(key);
  b.hazard_text.push_back(std::string(kind) + ": " + who(now_t) + " " + now_does + " shared byte " +
                          std::to_string(offset) + " at " + where(now) + "; " + who(prev_t) + " " + prev_did + " at " +
                          where(prev));
}

// Did access (thread u, its warp's __syncwarp interval uw) happen in the current interval of thread t,
// unordered with t? (Both in the current barrier interval is checked by the caller; u != t.)
inline bool unordered(const Block& b, int u, uint16_t uw, int t) {
  return (u >> 5) != (t >> 5) || uw == b.warp_epoch[t >> 5];
}

// Record an access of the running thread to [p, p + bytes) and report its hazards. Only dynamic
// shared memory is shadowed (static __shared__ arrays are not checked).
inline void shadow_access(const void* p, size_t bytes, Access a, const std::source_location& loc) {
  Block& b = *tls.block;
  if (b.shadow == nullptr) return;
  const uintptr_t base = reinterpret_cast<uintptr_t>(b.dyn_smem), at = reinterpret_cast<uintptr_t>(p);
  if (at < base || at + bytes > base + b.dyn_smem_bytes) return;
  const int t = b.cur;
  const uint32_t E = tls.epoch;
  const uint16_t we = b.warp_epoch[t >> 5];
  const size_t off = at - base;
  for (size_t i = off >> 1, end = (off + bytes + 1) >> 1; i < end; ++i) {
    Cell& c = b.shadow[i];
    if (a == Access::read) {
      if (c.flags & kPending)
        report(b, "read-after-write", loc, t, "reads", c.w_loc, c.w_thread,
               "issued a cp.async into it that no cp.async.wait_group has landed yet", 2 * i);
      else if (c.w_epoch == E && c.w_thread != t && unordered(b, c.w_thread, c.w_wepoch, t))
        report(b, "read-after-write", loc, t, "reads", c.w_loc, c.w_thread, "wrote it in the same barrier interval",
               2 * i);
      if (c.r_epoch == E && c.r_thread != t && unordered(b, c.r_thread, c.r_wepoch, t)) {
        c.flags |= kManyReaders;  // keep the first reader
      } else if (!(c.r_epoch == E && c.r_thread == t)) {
        c.r_epoch = E, c.r_thread = uint16_t(t), c.r_wepoch = we, c.r_loc = loc;
        c.flags &= uint8_t(~kManyReaders);
      }
    } else {
      const char* does = a == Access::async_write ? "writes (cp.async)" : "writes";
      if (c.flags & kPending)
        report(b, "write-after-write", loc, t, does, c.w_loc, c.w_thread,
               "issued a cp.async into it that no cp.async.wait_group has landed yet", 2 * i);
      else if (c.w_epoch == E && c.w_thread != t && unordered(b, c.w_thread, c.w_wepoch, t))
        report(b, "write-after-write", loc, t, does, c.w_loc, c.w_thread, "wrote it in the same barrier interval",
               2 * i);
      if (c.r_epoch == E && (c.flags & kManyReaders))
        report(b, "write-after-read", loc, t, does, c.r_loc, -1, "read it in the same barrier interval", 2 * i);
      else if (c.r_epoch == E && c.r_thread != t && unordered(b, c.r_thread, c.r_wepoch, t))
        report(b, "write-after-read", loc, t, does, c.r_loc, c.r_thread, "read it in the same barrier interval", 2 * i);
      c.w_epoch = E, c.w_thread = uint16_t(t), c.w_wepoch = we, c.w_loc = loc;
      c.flags = uint8_t((c.flags & kManyReaders) | (a == Access::async_write ? kPending : 0));
    }
  }
}

// A cp.async of thread t lands: the copy happens now, and the shadow sees its write now.
inline void land(Block& b, int t, const AsyncCopy& c) {
  if (c.pred)
    std::memcpy(c.dst, c.src, 16);
  else
    std::memset(c.dst, 0, 16);
  if (b.shadow == nullptr) return;
  const size_t off = size_t(c.dst - b.dyn_smem);
  if (c.dst < b.dyn_smem || off + 16 > b.dyn_smem_bytes) return;
  for (size_t i = off >> 1; i < (off + 16) >> 1; ++i) {
    Cell& s = b.shadow[i];
    s.flags &= uint8_t(~kPending);
    s.w_epoch = tls.epoch, s.w_thread = uint16_t(t), s.w_wepoch = b.warp_epoch[t >> 5], s.w_loc = c.loc;
  }
}

inline void async_issue(void* dst, const void* src, bool pred, const std::source_location& loc) {
  Block& b = *tls.block;
  shadow_access(dst, 16, Access::async_write, loc);
  std::memset(dst, 0xFF, 16);  // poisoned (NaN) until the copy lands
  b.async[b.cur].push_back({static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), pred, -1, loc});
}

inline void async_commit() {
  Block& b = *tls.block;
  const int g = ++b.committed[b.cur];
  for (auto& c : b.async[b.cur])
    if (c.group < 0) c.group = g;
}

// cp.async.wait_group n: every committed group but the newest n has landed.
inline void async_wait(int n) {
  Block& b = *tls.block;
  const int t = b.cur, upto = b.committed[t] - n;
  auto& v = b.async[t];
  size_t keep = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i].group >= 0 && v[i].group <= upto)
      land(b, t, v[i]);
    else
      v[keep++] = v[i];
  }
  v.resize(keep);
}

// Compute every waiting lane's output of the warp's collective; "" or an error message.
inline std::string resolve(Warp& w, int warp_index);

inline std::string release_warp(Block& b, int wi) {
  Warp& w = b.warps[wi];
  std::string err = resolve(w, wi);
  for (int l = 0; l < 32; ++l)
    if (w.present >> l & 1u) {
      if (w.in[l].op == Op::syncwarp) ++b.warp_epoch[wi];  // __syncwarp orders the lanes' memory accesses
      break;
    }
  for (int l = 0; l < 32; ++l) {
    int t = wi * 32 + l;
    if (t < b.nthreads && b.fibers[t].state == State::warp) b.fibers[t].state = State::run;
  }
  w.arrived = 0;
  w.present = 0;
  return err;
}

// Called on the fiber: take part in a warp collective, wait until all live lanes are in it.
inline const LaneOut& warp_collective(const LaneIn& in) {
  Block& b = blk();
  const int t = b.cur, l = t & 31;
  Warp& w = b.warps[t >> 5];
  w.in[l] = in;
  w.present |= 1u << l;
  if (++w.arrived == w.live) {
    std::string err = release_warp(b, t >> 5);
    if (!err.empty()) fail(err);
  } else {
    b.fibers[t].state = State::warp;
    yield();
  }
  return w.out[l];
}

inline void block_barrier() {
  Block& b = blk();
  if (++b.at_barrier == b.live) {
    release_barrier(b);
  } else {
    b.fibers[b.cur].state = State::barrier;
    yield();
  }
}

inline void set_thread_index(const Block& b, int t) {
  threadIdx.x = t % blockDim.x;
  threadIdx.y = (t / blockDim.x) % blockDim.y;
  threadIdx.z = t / (blockDim.x * blockDim.y);
  (void)b;
}

inline void fiber_main() {
  Block& b = blk();
  b.body(b.ctx);
  // the thread returned from the kernel; its cp.async copies still in flight land now
  const int t = b.cur;
  for (const auto& c : b.async[t]) land(b, t, c);
  b.async[t].clear();
  b.fibers[t].state = State::done;
  --b.live;
  Warp& w = b.warps[t >> 5];
  --w.live;
  if (w.arrived > 0 && w.arrived == w.live) {
    std::string err = release_warp(b, t >> 5);
    if (!err.empty() && b.error.empty()) b.error = err;
  }
  if (b.at_barrier > 0 && b.at_barrier == b.live) release_barrier(b);
  for (;;) yield();
}

#if !defined(__x86_64__)
inline void fiber_main_uctx() { fiber_main(); }
#endif

// Run one block of `nthreads` threads to completion; throws on an emulator error.
inline void run_block(Block& b) {
  const int n = b.nthreads;
  b.live = n;
  b.at_barrier = 0;
  b.error.clear();
  for (int wi = 0; wi < (int)b.warps.size(); ++wi) {
    Warp& w = b.warps[wi];
    w.live = std::min(32, n - wi * 32);
    w.arrived = 0;
    w.present = 0;
    b.warp_epoch[wi] = 0;
  }
  for (int t = 0; t < n; ++t) {
    b.async[t].clear();
    b.committed[t] = 0;
  }
  ++tls.epoch;  // nothing of the previous block conflicts with this one
  b.hazards = 0;
  b.hazard_keys.clear();
  b.hazard_text.clear();
  b.rng = b.settings.seed * 0x9E3779B97F4A7C15ull +
          ((uint64_t(blockIdx.z) << 40) ^ (uint64_t(blockIdx.y) << 20) ^ blockIdx.x);
  if (b.dyn_smem_bytes) std::memset(b.dyn_smem, 0xFF, b.dyn_smem_bytes);
#if defined(__x86_64__)
  uint32_t csr = 0;
  uint16_t cw = 0;
  asm volatile("stmxcsr %0" : "=m"(csr));
  asm volatile("fnstcw %0" : "=m"(cw));
  for (int t = 0; t < n; ++t) {
    const Stack& s = tls.stacks[t];
    uint64_t* sp = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(s.base + s.size)) & ~uintptr_t(15));
    *--sp = 0;                                        // fake return address of fiber_main
    *--sp = reinterpret_cast<uint64_t>(&fiber_main);  // `ret` of the first switch lands here
    for (int i = 0; i < 6; ++i) *--sp = 0;            // rbp rbx r12 r13 r14 r15
    *--sp = (uint64_t(cw) << 32) | csr;               // mxcsr, x87 control word
    b.fibers[t].sp = sp;
    b.fibers[t].state = State::run;
  }
#else
  for (int t = 0; t < n; ++t) {
    getcontext(&b.uctx[t]);
    b.uctx[t].uc_stack.ss_sp = tls.stacks[t].base + 4096;
    b.uctx[t].uc_stack.ss_size = tls.stacks[t].size - 4096;
    b.uctx[t].uc_link = nullptr;
    makecontext(&b.uctx[t], fiber_main_uctx, 0);
    b.fibers[t].state = State::run;
  }
#endif
  // Run thread t until its next sync point; false when it is not runnable.
  auto step = [&](int t) {
    if (b.fibers[t].state != State::run) return false;
    b.cur = t;
    set_thread_index(b, t);
#if defined(__x86_64__)
    switch_stack(&b.sched_sp, b.fibers[t].sp);
#else
    swapcontext(&b.sched_uctx, &b.uctx[t]);
#endif
    if (!b.error.empty())
      throw std::runtime_error(std::string("vk emulator: kernel ") + b.kernel + ", block (" +
                               std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                               std::to_string(blockIdx.z) + "), thread " + std::to_string(t) + ": " + b.error);
    return true;
  };
  auto next_random = [&](uint64_t bound) {  // splitmix64
    uint64_t z = (b.rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (z ^ (z >> 31)) % bound;
  };
  const Schedule sched = b.settings.schedule;
  const int nwarps = (int)b.warps.size();
  int warp_order[32], lane_order[32];
  while (b.live > 0) {
    bool ran = false;
    if (sched == Schedule::round_robin || sched == Schedule::reverse) {
      for (int i = 0; i < n; ++i) ran |= step(sched == Schedule::reverse ? n - 1 - i : i);
    } else {
      // warp-major: each warp, in this pass's order, runs (its lanes in turn) until none can go on
      const bool rev = sched == Schedule::warp_major_reverse;
      for (int i = 0; i < nwarps; ++i) warp_order[i] = rev ? nwarps - 1 - i : i;
      if (sched == Schedule::random)
        for (int i = nwarps - 1; i > 0; --i) std::swap(warp_order[i], warp_order[next_random(i + 1)]);
      for (int k = 0; k < nwarps; ++k) {
        const int wi = warp_order[k], lanes = std::min(32, n - 32 * wi);
        for (bool any = true; any;) {
          for (int i = 0; i < lanes; ++i) lane_order[i] = rev ? lanes - 1 - i : i;
          if (sched == Schedule::random)
            for (int i = lanes - 1; i > 0; --i) std::swap(lane_order[i], lane_order[next_random(i + 1)]);
          any = false;
          for (int i = 0; i < lanes; ++i) any |= step(32 * wi + lane_order[i]);
          ran |= any;
        }
      }
    }
    if (!ran && b.live > 0) {
      int at_warp = 0;
      for (auto& f : b.fibers) at_warp += f.state == State::warp;
      throw std::runtime_error(std::string("vk emulator: kernel ") + b.kernel +
                               ": deadlock: " + std::to_string(b.at_barrier) + " threads wait at __syncthreads and " +
                               std::to_string(at_warp) +
                               " at warp collectives that cannot complete "
                               "(divergent barrier or collective?)");
    }
  }
  if (b.hazards > 0) {
    std::string msg = std::string("vk emulator racecheck: kernel ") + b.kernel + ", block (" +
                      std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) +
                      "): " + std::to_string(b.hazards) + " shared-memory hazard(s); distinct ones:";
    for (const auto& h : b.hazard_text) msg += "\n  " + h;
    throw std::runtime_error(msg);
  }
}

template <class Body>
void body_thunk(void* p) {
  (*static_cast<Body*>(p))();
}

// Run `body` (one CUDA thread's work) for every thread of every block of the grid.
template <class Body>
void launch(const char* kernel, dim3 grid, dim3 block, size_t smem_bytes, Body&& body) {
  const long long nthreads = (long long)block.x * block.y * block.z;
  if (nthreads < 1 || nthreads > 1024)
    throw std::runtime_error(std::string("vk emulator: kernel ") + kernel + ": block of " + std::to_string(nthreads) +
                             " threads (expected 1..1024)");
  if (smem_bytes > 227 * 1024)
    throw std::runtime_error(std::string("vk emulator: kernel ") + kernel + ": " + std::to_string(smem_bytes) +
                             " bytes of dynamic shared memory (at most 227 KiB per block)");
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error(std::string("vk emulator: kernel ") + kernel + ": invalid grid");
  if (tls.block != nullptr) throw std::runtime_error("vk emulator: a kernel launched another kernel (not supported)");
  while (tls.stacks.size() < (size_t)nthreads) tls.stacks.push_back(new_stack());
  if (tls.dyn_smem.size() < smem_bytes) tls.dyn_smem.resize(smem_bytes);

  Block b;
  b.kernel = kernel;
  b.body = &body_thunk<std::remove_reference_t<Body>>;
  b.ctx = const_cast<void*>(static_cast<const void*>(&body));
  b.nthreads = (int)nthreads;
  b.fibers.resize(nthreads);
  b.warps.resize((nthreads + 31) / 32);
  b.dyn_smem = tls.dyn_smem.data();
  b.dyn_smem_bytes = smem_bytes;
  b.settings = settings();
  b.async.resize(nthreads);
  b.committed.resize(nthreads);
  b.warp_epoch.resize(b.warps.size());
  if (b.settings.racecheck && smem_bytes > 0) {
    tls.shadow.assign((smem_bytes + 1) / 2, Cell{});
    b.shadow = tls.shadow.data();
  }
#if !defined(__x86_64__)
  b.uctx.resize(nthreads);
#endif
  const dim3 saved_bd = blockDim, saved_gd = gridDim;
  const uint3 saved_bi = blockIdx, saved_ti = threadIdx;
  blockDim = block;
  gridDim = grid;
  tls.block = &b;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = {x, y, z};
          run_block(b);
        }
  } catch (...) {
    tls.block = nullptr;
    blockDim = saved_bd, gridDim = saved_gd, blockIdx = saved_bi, threadIdx = saved_ti;
    throw;
  }
  tls.block = nullptr;
  blockDim = saved_bd, gridDim = saved_gd, blockIdx = saved_bi, threadIdx = saved_ti;
}

template <class... P, class... A>
void launch_kernel(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, A&&... args) {
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  auto body = [&]() { std::apply(kernel, params); };
  launch(name, grid, block, smem_bytes, body);
}

inline unsigned char* dynamic_smem() {
  if (tls.block == nullptr) throw std::runtime_error("vk emulator: dynamic shared memory outside a kernel");
  return tls.block->dyn_smem;
}

}  // namespace emu
}  // namespace vk

// ------------------------------------------------------------------ 4. CUDA intrinsics
inline void __syncthreads() { vk::emu::block_barrier(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  vk::emu::LaneIn in{};
  in.op = vk::emu::Op::syncwarp;
  in.mask = mask;
  vk::emu::warp_collective(in);
}

namespace vk::emu {
template <class T>
T shfl(unsigned mask, T var, int src) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  LaneIn in{};
  in.op = Op::shfl;
  in.mask = mask;
  in.src = src;
  std::memcpy(&in.v[0], &var, sizeof(T));
  const LaneOut& out = warp_collective(in);
  T r;
  std::memcpy(&r, &out.v[0], sizeof(T));
  return r;
}
// Returns {ballot of the participating lanes, mask of the participating lanes}.
inline std::pair<uint32_t, uint32_t> vote(unsigned mask, bool pred) {
  LaneIn in{};
  in.op = Op::vote;
  in.mask = mask;
  in.v[0] = pred ? 1 : 0;
  const LaneOut& out = warp_collective(in);
  return {static_cast<uint32_t>(out.v[0]), static_cast<uint32_t>(out.v[1])};
}
}  // namespace vk::emu

template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  const int l = vk::emu::lane();
  return vk::emu::shfl(mask, var, (l & ~(width - 1)) + (src_lane & (width - 1)));
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  const int l = vk::emu::lane();
  int s = l ^ lane_mask;
  if ((s & ~(width - 1)) != (l & ~(width - 1))) s = l;
  return vk::emu::shfl(mask, var, s);
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int l = vk::emu::lane();
  int s = ((l & (width - 1)) + (int)delta < width) ? l + (int)delta : l;
  return vk::emu::shfl(mask, var, s);
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int l = vk::emu::lane();
  int s = ((l & (width - 1)) >= (int)delta) ? l - (int)delta : l;
  return vk::emu::shfl(mask, var, s);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return vk::emu::vote(mask, pred != 0).first; }
inline int __any_sync(unsigned mask, int pred) { return vk::emu::vote(mask, pred != 0).first != 0; }
inline int __all_sync(unsigned mask, int pred) {
  const auto [ballot, lanes] = vk::emu::vote(mask, pred != 0);
  return ballot == lanes;
}

// Threads of a block never run at the same time, so read-modify-write is atomic as written.
template <class T>
T atomicAdd(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}
template <class T>
T atomicMax(T* p, T v) {
  T old = *p;
  if (v > old) *p = v;
  return old;
}
template <class T>
T atomicMin(T* p, T v) {
  T old = *p;
  if (v < old) *p = v;
  return old;
}
template <class T>
T atomicExch(T* p, T v) {
  T old = *p;
  *p = v;
  return old;
}
template <class T>
T atomicCAS(T* p, T compare, T v) {
  T old = *p;
  if (old == compare) *p = v;
  return old;
}

// ------------------------------------------------------------------ 5. namespace vk
namespace vk {

// 16-bit floats as bit patterns; conversions round to nearest even (NaN stays NaN).
struct half {
  uint16_t bits;
};
struct bfloat16 {
  uint16_t bits;
};

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, f;
  if (exp == 0x1f) {
    f = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    f = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    f = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(man & 0x400u)) {
      man <<= 1;
      --exp;
    }
    f = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float r;
  std::memcpy(&r, &f, 4);
  return r;
}

inline uint16_t float_to_half_bits(float x) {
  uint32_t f;
  std::memcpy(&f, &x, 4);
  const uint16_t sign = uint16_t((f >> 16) & 0x8000u);
  const uint32_t absf = f & 0x7fffffffu;
  if (absf >= 0x7f800000u) return sign | (absf > 0x7f800000u ? 0x7e00u : 0x7c00u);  // nan / inf
  if (absf >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: overflow to inf
  if (absf < 0x38800000u) {                        // below 2^-14: subnormal or zero
    // value = absf as float; half subnormal unit = 2^-24
    float a;
    std::memcpy(&a, &absf, 4);
    const float scaled = a * 16777216.0f;  // exact (power of two)
    // round half to even via nearbyint in the default rounding mode
    return sign | uint16_t(std::nearbyint(scaled));
  }
  uint32_t exp = (absf >> 23) - 112, man = absf & 0x7fffffu;
  uint32_t h = (exp << 10) | (man >> 13);
  const uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: correct
  return sign | uint16_t(h);
}

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t f = uint32_t(b) << 16;
  float r;
  std::memcpy(&r, &f, 4);
  return r;
}
inline uint16_t float_to_bf16_bits(float x) {
  uint32_t f;
  std::memcpy(&f, &x, 4);
  if ((f & 0x7fffffffu) > 0x7f800000u) return uint16_t((f >> 16) | 0x40u);  // quiet NaN
  f += 0x7fffu + ((f >> 16) & 1u);
  return uint16_t(f >> 16);
}

inline float to_float(float x) { return x; }
inline float to_float(half x) { return half_bits_to_float(x.bits); }
inline float to_float(bfloat16 x) { return bf16_bits_to_float(x.bits); }

template <class T>
T from_float(float x);
template <>
inline float from_float<float>(float x) {
  return x;
}
template <>
inline half from_float<half>(float x) {
  return half{float_to_half_bits(x)};
}
template <>
inline bfloat16 from_float<bfloat16>(float x) {
  return bfloat16{float_to_bf16_bits(x)};
}

template <class T>
inline uint16_t bits_of(float x);
template <>
inline uint16_t bits_of<half>(float x) {
  return float_to_half_bits(x);
}
template <>
inline uint16_t bits_of<bfloat16>(float x) {
  return float_to_bf16_bits(x);
}

template <class T>
inline uint32_t pack2(float lo, float hi) {
  return uint32_t(bits_of<T>(lo)) | (uint32_t(bits_of<T>(hi)) << 16);
}

namespace emu {

inline float lane_half(const uint32_t r, int h, bool bf16) {
  const uint16_t bits = uint16_t(r >> (16 * h));
  return bf16 ? bf16_bits_to_float(bits) : half_bits_to_float(bits);
}

inline std::string resolve_mma(Warp& w, bool bf16) {
  if (w.present != 0xffffffffu) return "mma.sync needs all 32 lanes of the warp";
  // Rebuild A (16x16, row-major) and B (16x8, k x n) from the fragments (PTX ISA, mma.m16n8k16):
  //   groupID = lane >> 2, tig = lane % 4
  //   A: reg r holds row groupID + 8*(r & 1), cols 2*tig + 8*(r >> 1) + {0, 1}
  //   B: reg r holds rows (k) 2*tig + 8*r + {0, 1}, col (n) groupID
  //   C/D: element i is row groupID + 8*(i >> 1), col 2*tig + (i & 1)
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int r = 0; r < 4; ++r) {
      const uint32_t reg = uint32_t(w.in[l].v[r >> 1] >> (32 * (r & 1)));
      for (int h = 0; h < 2; ++h) A[g + 8 * (r & 1)][2 * t + 8 * (r >> 1) + h] = lane_half(reg, h, bf16);
    }
    for (int r = 0; r < 2; ++r) {
      const uint32_t reg = uint32_t(w.in[l].v[2] >> (32 * r));
      for (int h = 0; h < 2; ++h) B[2 * t + 8 * r + h][g] = lane_half(reg, h, bf16);
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    float d[4];
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
      float c;
      const uint32_t cb = uint32_t(w.in[l].v[3 + (i >> 1)] >> (32 * (i & 1)));
      std::memcpy(&c, &cb, 4);
      float acc = c;
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      d[i] = acc;
    }
    std::memcpy(&w.out[l].v[0], d, 16);
  }
  return "";
}

inline std::string resolve_ldmatrix(Warp& w, int count, bool trans) {
  // Lanes 8j..8j+7 give the row addresses of matrix j (8 rows of 8 16-bit values, 16 bytes each).
  // Without .trans lane l gets row l/4, elements 2*(l%4) and 2*(l%4)+1 of every matrix;
  // with .trans it gets column l/4, rows 2*(l%4) and 2*(l%4)+1.
  for (int j = 0; j < count * 8; ++j)
    if (!(w.present >> j & 1u)) return "ldmatrix: lane " + std::to_string(j) + " gives a row address but exited";
  for (int l = 0; l < 32; ++l) {
    uint32_t r[4] = {0, 0, 0, 0};
    for (int j = 0; j < count; ++j) {
      uint16_t e[2];
      for (int h = 0; h < 2; ++h) {
        const int row = trans ? 2 * (l & 3) + h : l >> 2;
        const int col = trans ? l >> 2 : 2 * (l & 3) + h;
        const unsigned char* p = reinterpret_cast<const unsigned char*>(w.in[j * 8 + row].v[0]);
        std::memcpy(&e[h], p + 2 * col, 2);
      }
      r[j] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
    }
    std::memcpy(&w.out[l].v[0], r, 16);
  }
  return "";
}

inline std::string resolve(Warp& w, int wi) {
  Op op = Op::none;
  uint8_t arg = 0;
  for (int l = 0; l < 32; ++l) {
    if (!(w.present >> l & 1u)) continue;
    if (!(w.in[l].mask >> l & 1u) && (w.in[l].op == Op::shfl || w.in[l].op == Op::vote || w.in[l].op == Op::syncwarp))
      return "lane " + std::to_string(l) + " of warp " + std::to_string(wi) +
             " calls a warp collective with a mask that does not contain it";
    if (op == Op::none) {
      op = w.in[l].op;
      arg = w.in[l].arg;
    } else if (w.in[l].op != op || w.in[l].arg != arg) {
      return "lanes of warp " + std::to_string(wi) + " are in different warp collectives (divergent code?)";
    }
  }
  switch (op) {
    case Op::syncwarp:
    case Op::none: return "";
    case Op::shfl:
      for (int l = 0; l < 32; ++l) {
        if (!(w.present >> l & 1u)) continue;
        const int s = w.in[l].src;
        if (s < 0 || s > 31 || !(w.present >> s & 1u))
          return "shuffle: lane " + std::to_string(l) + " of warp " + std::to_string(wi) + " reads lane " +
                 std::to_string(s) + ", which is not taking part";
        w.out[l].v[0] = w.in[s].v[0];
      }
      return "";
    case Op::vote: {
      uint64_t ballot = 0;
      for (int l = 0; l < 32; ++l)
        if ((w.present >> l & 1u) && w.in[l].v[0]) ballot |= 1ull << l;
      for (int l = 0; l < 32; ++l) {
        w.out[l].v[0] = ballot;
        w.out[l].v[1] = w.present;
      }
      return "";
    }
    case Op::mma_f16: return resolve_mma(w, false);
    case Op::mma_bf16: return resolve_mma(w, true);
    case Op::ldsm: return resolve_ldmatrix(w, arg & 0xf, (arg >> 4) != 0);
  }
  return "";
}

template <class T>
constexpr Op mma_op();
template <>
constexpr Op mma_op<half>() {
  return Op::mma_f16;
}
template <>
constexpr Op mma_op<bfloat16>() {
  return Op::mma_bf16;
}

inline void ldmatrix(uint32_t* r, const void* p, int count, bool trans, const std::source_location& loc) {
  if (lane() < count * 8) shadow_access(p, 16, Access::read, loc);  // this lane's row address
  LaneIn in{};
  in.op = Op::ldsm;
  in.arg = uint8_t(count | (trans ? 0x10 : 0));
  in.v[0] = reinterpret_cast<uint64_t>(p);
  const LaneOut& out = warp_collective(in);
  uint32_t tmp[4];
  std::memcpy(tmp, &out.v[0], 16);
  for (int j = 0; j < count; ++j) r[j] = tmp[j];
}

}  // namespace emu

template <class T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  emu::LaneIn in{};
  in.op = emu::mma_op<T>();
  in.v[0] = uint64_t(a[0]) | (uint64_t(a[1]) << 32);
  in.v[1] = uint64_t(a[2]) | (uint64_t(a[3]) << 32);
  in.v[2] = uint64_t(b[0]) | (uint64_t(b[1]) << 32);
  uint32_t cb[4];
  std::memcpy(cb, c, 16);
  in.v[3] = uint64_t(cb[0]) | (uint64_t(cb[1]) << 32);
  in.v[4] = uint64_t(cb[2]) | (uint64_t(cb[3]) << 32);
  const emu::LaneOut& out = emu::warp_collective(in);
  std::memcpy(d, &out.v[0], 16);
}

// The source_location arguments are the caller's line (for the race checker's reports).
using srcloc = std::source_location;
inline void ldmatrix_x1(uint32_t* r, const void* p, srcloc l = srcloc::current()) { emu::ldmatrix(r, p, 1, false, l); }
inline void ldmatrix_x2(uint32_t* r, const void* p, srcloc l = srcloc::current()) { emu::ldmatrix(r, p, 2, false, l); }
inline void ldmatrix_x4(uint32_t* r, const void* p, srcloc l = srcloc::current()) { emu::ldmatrix(r, p, 4, false, l); }
inline void ldmatrix_x1_trans(uint32_t* r, const void* p, srcloc l = srcloc::current()) {
  emu::ldmatrix(r, p, 1, true, l);
}
inline void ldmatrix_x2_trans(uint32_t* r, const void* p, srcloc l = srcloc::current()) {
  emu::ldmatrix(r, p, 2, true, l);
}
inline void ldmatrix_x4_trans(uint32_t* r, const void* p, srcloc l = srcloc::current()) {
  emu::ldmatrix(r, p, 4, true, l);
}

inline void cp_async_16(void* smem, const void* gmem, bool pred, srcloc l = srcloc::current()) {
  emu::async_issue(smem, gmem, pred, l);
}
inline void cp_async_commit() { emu::async_commit(); }
template <int N>
inline void cp_async_wait() {
  emu::async_wait(N);
}

// Plain shared-memory loads and stores the race checker sees.
template <class T>
inline T ld_shared(const T* p, srcloc l = srcloc::current()) {
  emu::shadow_access(p, sizeof(T), emu::Access::read, l);
  return *p;
}
template <class T>
inline void st_shared(T* p, const T& v, srcloc l = srcloc::current()) {  // T deduced as on the GPU
  emu::shadow_access(p, sizeof(T), emu::Access::write, l);
  *p = v;
}

}  // namespace vk

#define VK_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::vk::emu::dynamic_smem())

#define VK_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ::vk::emu::launch_kernel(#kernel, (kernel), dim3(grid), dim3(block), (smem_bytes), __VA_ARGS__)
