// A CUDA emulator for apt_kernels' kernels, for machines without a GPU: the .cu sources (launches rewritten by
// tests/cuda_emu/emu_build.py) compile as plain C++ against this header, and every launch runs on the host, one block
// at a time, each CUDA thread a fiber (its own stack) on one OS thread. Fibers switch only at __syncthreads and warp
// collectives (shuffles, mma, ldmatrix), so shared memory and atomics need no locks.
//
// What it checks, beyond the results the tests compare: launch configurations the hardware rejects (empty or
// oversized grids and blocks, dynamic shared memory past what was opted into), __syncthreads reached by only part of
// a block (the rest waiting elsewhere or exited), a warp collective reached by only part of a warp (a hang or
// undefined result on a GPU), a shuffle reading an exited or missing lane, misaligned or out-of-shared-memory
// ldmatrix/cp.async addresses, and data races that depend on thread order: fibers run in a seeded random order in
// every phase between barriers, warps drift apart (a random part of the ready warps is held back at each warp
// collective), blocks run in a random order (APT_CUDA_EMU_SEED), and a cp.async copy lands only when its thread
// waits for its group. Shared memory, static and dynamic, starts as 0xff bytes (NaN as float, -1 as int) in every
// block, so reading it before writing it shows; a block using more than the device's 227 KB (48 KB static) fails.
// mma.sync and ldmatrix compute from every lane's registers with the PTX fragment layouts (csrc/common/apt_mma.cuh).
//
// Not modelled: warp-synchronous code without a collective or barrier, memory outside the tensors, performance.
#pragma once
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif
#if defined(__x86_64__)
// tests/cuda_emu/emu_runtime.cpp: saves the callee-saved registers on this stack, stores its pointer in *save_sp,
// switches to load_sp and pops them there. No system call, unlike swapcontext (which also saves the signal mask):
// a barrier switches every fiber of the block twice, so this is most of the emulator's time.
extern "C" void apt_emu_switch(void** save_sp, void* load_sp);
#else
#include <ucontext.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// emu_build.py rewrites every `__shared__ T name[..];` into a reference to per-block storage (shared_var); one it
// missed is a compile error, not silently a function static shared by every block.
#define __shared__ __shared___declaration_not_rewritten_by_emu_build
#define APT_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::apt_emu::dynamic_smem())

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;
};

// fp16 / bf16 storage types with the conversions the kernels use (round to nearest even, as the device's _rn)
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = static_cast<uint32_t>(h.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    h.x = static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    h.x = static_cast<uint16_t>(u >> 16);
  }
  return h;
}
inline float __expf(float x) { return std::exp(x); }

namespace apt_emu {

enum class St { Run, Block, Warp, Done };

// a cp.async of 16 bytes, done when its thread waits for its group (the latest moment the hardware may finish it)
struct AsyncCopy {
  void* dst;
  const void* src;
};

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  uint3 tid;
  int linear = 0;
  St st = St::Run;
  uint64_t shuffles = 0;  // shuffles this fiber has entered (pairs a lane's slot with its partner's)
  std::vector<AsyncCopy> async_open;               // issued, not committed
  std::vector<std::vector<AsyncCopy>> async_groups;  // committed, oldest first
};

struct Slot {
  uint64_t value = 0;
  uint64_t stamp = 0;
};

// a lane's operands of a tensor-core mma (csrc/common/apt_mma.cuh)
struct MmaSlot {
  uint32_t a[4] = {}, b[2] = {};
  uint64_t stamp = 0;
  int kind = -1;
};

struct Sched {
#if defined(__x86_64__)
  void* main_sp = nullptr;
#else
  ucontext_t main;
#endif
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<unsigned char[]>> stacks;
  std::vector<Slot> slots;  // 32 per warp
  std::vector<MmaSlot> mma_slots;  // likewise
  std::vector<unsigned char> dyn;
  static constexpr size_t kStaticLimit = 48 * 1024, kSmemLimit = 232448;  // H100/H200: 48 KB static, 227 KB in all
#if defined(__SANITIZE_ADDRESS__)
  // a poisoned gap before every static shared variable, so ASan sees one overrun the next (up to 256 variables)
  static constexpr size_t kRedzone = 64, kMaxStatics = 256;
#else
  static constexpr size_t kRedzone = 0, kMaxStatics = SIZE_MAX;
#endif
  // never resized: references stay
  std::vector<unsigned char> statics = std::vector<unsigned char>(kStaticLimit + kRedzone * kMaxStatics);
  std::map<const void*, size_t> static_of;  // declaration site -> offset in statics, this block
  size_t static_used = 0;  // bytes of statics taken, redzones included
  size_t static_rz = 0;    // of which redzones (not counted against the limits)
  Fiber* cur = nullptr;
  uint3 bidx{0, 0, 0};
  dim3 bdim, gdim;
  const std::function<void()>* body = nullptr;
  std::string error;  // first failure of the current launch
  std::string last_error_text;
  cudaError_t last_error = cudaSuccess;
  std::map<const void*, size_t> granted;  // dynamic shared memory opted into per kernel
  uint64_t rng = 0;  // xorshift64* state
  // this block's counts, kept as fibers change state: done, waiting at __syncthreads, per warp waiting at a
  // shuffle and still live
  int n_done = 0, n_block = 0;
  std::vector<int> warp_wait, warp_live;
  std::vector<int> order;
  std::vector<int> ready;  // warps whose live lanes all wait at a warp collective
  bool seeded = false;
  static constexpr size_t kStack = 256 * 1024;
};

inline Sched g_sched;  // one per module (an inline variable), no initialisation guard on each access
inline Sched& S() { return g_sched; }

inline const uint3& thread_idx() { return S().cur->tid; }
inline const uint3& block_idx() { return S().bidx; }
inline const dim3& block_dim() { return S().bdim; }
inline const dim3& grid_dim() { return S().gdim; }
inline unsigned char* dynamic_smem() { return S().dyn.data(); }

inline void fail(const std::string& what);

// The block's copy of the static __shared__ variable declared at `site` (a static of the declaring function, so
// one per template instantiation): the same storage for every fiber of the block, fresh (0xff) in each block.
template <typename T>
inline T& shared_var(const void* site) {
  Sched& s = S();
  auto it = s.static_of.find(site);
  if (it == s.static_of.end()) {
    const size_t off = ((s.static_used + 15) & ~size_t(15)) + Sched::kRedzone;
    const char* over = nullptr;
    if (s.static_of.size() >= Sched::kMaxStatics)
      over = "more static __shared__ variables than the ASan build of the emulator has redzones for";
    else if (off + sizeof(T) - (s.static_rz + Sched::kRedzone) > Sched::kStaticLimit)
      over = "more than 48 KB of static shared memory";
    if (over) {
      fail(over);
      // the launch has failed: the kernel still runs on, through this stand-in, which must not read as an overrun
      // (the statics are poisoned under ASan: a use-after-poison report and abort instead of the message above)
#if defined(__SANITIZE_ADDRESS__)
      __asan_unpoison_memory_region(s.statics.data(), s.statics.size());
#endif
      return *reinterpret_cast<T*>(s.statics.data());
    }
    s.static_rz += Sched::kRedzone;
#if defined(__SANITIZE_ADDRESS__)
    __asan_unpoison_memory_region(s.statics.data() + off, sizeof(T));
#endif
    std::memset(s.statics.data() + off, 0xff, sizeof(T));
    s.static_used = off + sizeof(T);
    it = s.static_of.emplace(site, off).first;
  }
  return *reinterpret_cast<T*>(s.statics.data() + it->second);
}

inline void fail(const std::string& what) {
  Sched& s = S();
  if (s.error.empty()) {
    s.error = what + " (block " + std::to_string(s.bidx.x) + "," + std::to_string(s.bidx.y) + "," +
              std::to_string(s.bidx.z) + (s.cur ? ", thread " + std::to_string(s.cur->linear) : std::string()) + ")";
  }
}

inline void yield_to_scheduler() {
  Sched& s = S();
#if defined(__x86_64__)
  apt_emu_switch(&s.cur->sp, s.main_sp);
#else
  swapcontext(&s.cur->ctx, &s.main);
#endif
}

inline void resume(Fiber& f) {
  Sched& s = S();
  s.cur = &f;
#if defined(__x86_64__)
  apt_emu_switch(&s.main_sp, f.sp);
#else
  swapcontext(&s.main, &f.ctx);
#endif
}

inline void syncthreads() {
  Sched& s = S();
  s.cur->st = St::Block;
  ++s.n_block;
  yield_to_scheduler();
}

inline void warp_barrier() {
  Sched& s = S();
  s.cur->st = St::Warp;
  ++s.warp_wait[s.cur->linear / 32];
  yield_to_scheduler();
}

inline void shfl_xor(unsigned mask, const void* in, void* out, size_t bytes, int lane_mask, int width) {
  Sched& s = S();
  Fiber* f = s.cur;
  if (mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask (not modelled by the emulator)");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail("__shfl_xor_sync: width must be a power of 2 <= 32");
  const int lane = f->linear % 32, warp = f->linear / 32;
  const uint64_t stamp = ++f->shuffles;
  Slot& mine = s.slots[static_cast<size_t>(warp) * 32 + lane];
  std::memcpy(&mine.value, in, bytes);
  mine.stamp = stamp;
  warp_barrier();
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;  // outside this lane's segment: own value
  const int src_linear = warp * 32 + src;
  const Slot& theirs = s.slots[static_cast<size_t>(src_linear)];
  if (src_linear >= static_cast<int>(s.fibers.size()) || s.fibers[src_linear].st == St::Done ||
      theirs.stamp != stamp) {
    fail("__shfl_xor_sync: lane " + std::to_string(lane) + " reads lane " + std::to_string(src) +
         ", which does not exist, has exited or is at another shuffle");
    std::memcpy(out, in, bytes);
  } else {
    std::memcpy(out, &theirs.value, bytes);
  }
  warp_barrier();  // nobody overwrites a slot before the whole warp has read
}

// p .. p + bytes inside this block's shared memory (static or dynamic)
inline bool in_shared(const void* p, size_t bytes) {
  Sched& s = S();
  const auto* c = static_cast<const unsigned char*>(p);
  return (c >= s.statics.data() && c + bytes <= s.statics.data() + s.static_used) ||
         (c >= s.dyn.data() && c + bytes <= s.dyn.data() + s.dyn.size());
}

// The second half of entering a warp-wide instruction `what` (mma, ldmatrix), after the lane posted its operands:
// waits for the warp, then checks that all 32 lanes are live and `same(l)` (lane l posted for this instruction).
// False after failing the launch.
template <typename Same>
inline bool warp_collective(const char* what, int warp, int lane, Same same) {
  Sched& s = S();
  warp_barrier();  // released once every live lane is here or at another collective: warp_live is final
  if (s.warp_live[warp] != 32) {
    fail(std::string(what) + " in a warp with " + std::to_string(s.warp_live[warp]) + " live lanes (needs all 32)");
    return false;
  }
  for (int l = 0; l < 32; ++l)
    if (!same(l)) {
      fail(std::string(what) + ": lane " + std::to_string(l) + " is not at the same " + what + " as lane " +
           std::to_string(lane));
      warp_barrier();
      return false;
    }
  return true;
}

inline float mma_elem(int kind, uint32_t reg, int half) {
  const uint16_t u = static_cast<uint16_t>(reg >> (16 * half));
  if (kind == 1) {
    const uint32_t w = static_cast<uint32_t>(u) << 16;
    float f;
    std::memcpy(&f, &w, 4);
    return f;
  }
  return __half2float(__half{u});
}

// mma.sync.m16n8k16 (f32 += f16·f16 or bf16·bf16) for the current lane: every lane of the warp posts its A and B
// registers, then each computes its own four C elements from the others' with the PTX fragment layouts (see
// apt_mma.cuh). The whole warp must be live and at this same mma, as the hardware requires.
inline void mma_16816(int kind, float* d, const uint32_t* a, const uint32_t* b) {
  Sched& s = S();
  Fiber* f = s.cur;
  const int lane = f->linear % 32, warp = f->linear / 32;
  const uint64_t stamp = ++f->shuffles;
  MmaSlot& mine = s.mma_slots[static_cast<size_t>(warp) * 32 + lane];
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  mine.stamp = stamp;
  mine.kind = kind;
  const MmaSlot* w = &s.mma_slots[static_cast<size_t>(warp) * 32];
  if (!warp_collective("mma", warp, lane, [&](int l) { return w[l].stamp == stamp && w[l].kind == kind; })) return;
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) {
      const MmaSlot& sa = w[(row % 8) * 4 + (k % 8) / 2];
      const MmaSlot& sb = w[col * 4 + (k % 8) / 2];
      const float x = mma_elem(kind, sa.a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k & 1);
      const float y = mma_elem(kind, sb.b[k >= 8 ? 1 : 0], k & 1);
      acc += x * y;
    }
    d[e] = acc;
  }
  warp_barrier();  // nobody posts the next mma's operands before the whole warp has read these
}

// ldmatrix.x4 (.trans) for the current lane: every lane posts its row address (16-byte aligned, in this block's
// shared memory), then each gathers its four registers from the rows the others posted (layouts: apt_mma.cuh).
inline void ldmatrix_x4(uint32_t* r, const uint16_t* row, bool trans) {
  Sched& s = S();
  Fiber* f = s.cur;
  const int lane = f->linear % 32, warp = f->linear / 32;
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) fail("ldmatrix: a row address not 16-byte aligned");
  else if (!in_shared(row, 16)) fail("ldmatrix: a row outside shared memory");
  const uint64_t stamp = ++f->shuffles;
  Slot& mine = s.slots[static_cast<size_t>(warp) * 32 + lane];
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  std::memcpy(&mine.value, &addr, sizeof(addr));
  mine.stamp = stamp;
  const Slot* w = &s.slots[static_cast<size_t>(warp) * 32];
  if (!warp_collective("ldmatrix", warp, lane, [&](int l) { return w[l].stamp == stamp; })) return;
  const auto row_of = [&](int src) {
    uintptr_t a;
    std::memcpy(&a, &w[src].value, sizeof(a));
    return reinterpret_cast<const uint16_t*>(a);
  };
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* p = row_of(8 * j + lane / 4);
      lo = p[2 * (lane % 4)];
      hi = p[2 * (lane % 4) + 1];
    } else {
      lo = row_of(8 * j + 2 * (lane % 4))[lane / 4];
      hi = row_of(8 * j + 2 * (lane % 4) + 1)[lane / 4];
    }
    r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  warp_barrier();
}

// cp.async.cg 16 bytes global -> shared: queued; the copy lands when the thread waits for its group, so a read
// before cp_async_wait + __syncthreads sees the old contents (shared memory starts as NaN), as it may on a GPU.
inline void cp_async16(void* dst, const void* src) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0)
    fail("cp.async: a 16-byte copy with an address not 16-byte aligned");
  else if (!in_shared(dst, 16)) fail("cp.async: a destination outside shared memory");
  else S().cur->async_open.push_back(AsyncCopy{dst, src});
}

inline void cp_async_commit() {
  Fiber* f = S().cur;
  f->async_groups.push_back(std::move(f->async_open));
  f->async_open.clear();
}

// waits until at most `pending` of this thread's committed groups are outstanding (uncommitted copies stay queued)
inline void cp_async_wait(int pending) {
  Fiber* f = S().cur;
  while (static_cast<int>(f->async_groups.size()) > pending) {
    for (const AsyncCopy& c : f->async_groups.front()) std::memcpy(c.dst, c.src, 16);
    f->async_groups.erase(f->async_groups.begin());
  }
}

// A fiber's first frame: runs the kernel, then hands control back for good.
inline void trampoline() {
  Sched& s = S();
  (*s.body)();
  s.cur->st = St::Done;
  ++s.n_done;
  --s.warp_live[s.cur->linear / 32];
  yield_to_scheduler();
}

inline void init_fiber(Fiber& f, unsigned char* stack, size_t bytes) {
#if defined(__SANITIZE_ADDRESS__)
  // a fiber abandoned mid-kernel (a failed launch) never unwound: its frames' redzones would stay poisoned
  __asan_unpoison_memory_region(stack, bytes);
#endif
#if defined(__x86_64__)
  // what apt_emu_switch pops: r15 r14 r13 r12 rbx rbp, then trampoline as the return address, then a null return
  // address for trampoline's own frame; sp 16-byte aligned so that trampoline starts as if just called
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top) - 8;
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;
  sp[6] = reinterpret_cast<void*>(&trampoline);
  sp[7] = nullptr;
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack;
  f.ctx.uc_stack.ss_size = bytes;
  f.ctx.uc_link = &S().main;
  makecontext(&f.ctx, trampoline, 0);
#endif
}

// A seeded xorshift64* (APT_CUDA_EMU_SEED, default 0): the random orders repeat from run to run.
inline uint64_t next_random() {
  Sched& s = S();
  if (!s.seeded) {
    const char* e = std::getenv("APT_CUDA_EMU_SEED");
    s.rng = (e ? std::strtoull(e, nullptr, 10) : 0) * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
    s.seeded = true;
  }
  s.rng ^= s.rng >> 12;
  s.rng ^= s.rng << 25;
  s.rng ^= s.rng >> 27;
  return s.rng * 0x2545F4914F6CDD1Dull;
}

template <typename T>
inline void shuffle(std::vector<T>& v) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next_random() % i]);
}

// Runs one block to completion (or to the first failure).
inline void run_block(const std::function<void()>& body, size_t smem) {
  Sched& s = S();
  const int n = static_cast<int>(s.bdim.x * s.bdim.y * s.bdim.z);
  s.fibers.assign(static_cast<size_t>(n), Fiber{});
  while (s.stacks.size() < static_cast<size_t>(n)) s.stacks.emplace_back(new unsigned char[Sched::kStack]);
  s.slots.assign(static_cast<size_t>((n + 31) / 32) * 32, Slot{});
  s.mma_slots.assign(s.slots.size(), MmaSlot{});
#if defined(__SANITIZE_ADDRESS__)
  if (s.dyn.capacity()) __asan_unpoison_memory_region(s.dyn.data(), s.dyn.capacity());
  __asan_poison_memory_region(s.statics.data(), s.statics.size());
#endif
  s.dyn.assign(std::max<size_t>(smem, 16), 0xff);
#if defined(__SANITIZE_ADDRESS__)
  if (s.dyn.capacity() > smem) __asan_poison_memory_region(s.dyn.data() + smem, s.dyn.capacity() - smem);
#endif
  s.static_of.clear();
  s.static_used = 0;
  s.static_rz = 0;
  s.body = &body;
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f.linear = i;
    f.tid = uint3{static_cast<unsigned>(i % s.bdim.x), static_cast<unsigned>((i / s.bdim.x) % s.bdim.y),
                  static_cast<unsigned>(i / (s.bdim.x * s.bdim.y))};
    // stack tops staggered by 1088 bytes: equally aligned tops would share cache sets and thrash at every switch
    init_fiber(f, s.stacks[i].get(), Sched::kStack - static_cast<size_t>(i % 60) * 1088);
  }
  const int warps = (n + 31) / 32;
  s.order.resize(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) s.order[i] = i;
  s.n_done = s.n_block = 0;
  s.warp_wait.assign(static_cast<size_t>(warps), 0);
  s.warp_live.assign(static_cast<size_t>(warps), 32);
  if (n % 32) s.warp_live[warps - 1] = n % 32;
  while (s.error.empty()) {
    shuffle(s.order);
    for (int i : s.order) {
      if (s.fibers[i].st != St::Run) continue;
      resume(s.fibers[i]);
      if (!s.error.empty()) break;
    }
    s.cur = nullptr;
    if (!s.error.empty()) break;
    const int done = s.n_done, at_block = s.n_block;
    if (done == n) break;
    bool released = false;
    // A warp whose live lanes all wait at a shuffle (mma, ldmatrix) goes on, but only a random half of the ready
    // warps (at least one) each round: warps drift apart between block barriers, as on a GPU, so a buffer that one
    // warp refills while another still reads it (a missing __syncthreads) shows.
    s.ready.clear();
    for (int w = 0; w < warps; ++w)
      if (s.warp_wait[w] != 0 && s.warp_wait[w] == s.warp_live[w]) s.ready.push_back(w);
    const size_t keep = s.ready.empty() ? 0 : next_random() % s.ready.size();  // held back this round
    shuffle(s.ready);
    for (size_t r = keep; r < s.ready.size(); ++r) {
      const int w = s.ready[r];
      for (int i = w * 32; i < std::min(n, w * 32 + 32); ++i)
        if (s.fibers[i].st == St::Warp) s.fibers[i].st = St::Run;
      s.warp_wait[w] = 0;
      released = true;
    }
    if (!released && at_block == n - done) {
      if (done > 0) {  // CUDA: a barrier in code that not all of the block reaches is undefined behaviour
        fail("__syncthreads reached by " + std::to_string(at_block) + " threads while " + std::to_string(done) +
             " of the block have exited");
        break;
      }
      for (Fiber& f : s.fibers)
        if (f.st == St::Block) f.st = St::Run;
      s.n_block = 0;
      released = true;
    }
    if (!released) {
      fail("deadlock: " + std::to_string(at_block) + " of " + std::to_string(n - done) +
           " live threads wait at __syncthreads, the others at a shuffle their warp does not all reach");
    }
  }
  if (s.error.empty() && s.static_used - s.static_rz + smem > Sched::kSmemLimit)
    fail(std::to_string(s.static_used - s.static_rz) + " bytes of static and " + std::to_string(smem) +
         " of dynamic shared memory: more than a block can have (" + std::to_string(Sched::kSmemLimit) + ")");
}

inline void run_grid(dim3 grid, dim3 block, size_t smem, const void* kernel, const std::function<void()>& body) {
  Sched& s = S();
  s.error.clear();
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  std::string bad;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) bad = "an empty grid";
  else if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) bad = "a grid past the limits";
  else if (threads == 0 || threads > 1024 || block.z > 64) bad = "a block of " + std::to_string(threads) + " threads";
  else {
    auto it = s.granted.find(kernel);
    const size_t allowed = std::max<size_t>(48 * 1024, it == s.granted.end() ? 0 : it->second);
    if (smem > allowed)
      bad = std::to_string(smem) + " bytes of dynamic shared memory (opted into " + std::to_string(allowed) + ")";
  }
  if (!bad.empty()) {
    s.last_error = cudaErrorInvalidConfiguration;
    s.last_error_text = "invalid launch configuration: " + bad;
    return;
  }
  s.gdim = grid;
  s.bdim = block;
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(uint3{x, y, z});
  shuffle(blocks);  // no kernel may depend on the order of its blocks
  for (const uint3& b : blocks) {
    s.bidx = b;
    run_block(body, smem);
    if (!s.error.empty()) break;
  }
  if (!s.error.empty()) {
    s.last_error = cudaErrorLaunchFailure;
    s.last_error_text = "emulated kernel failed: " + s.error;
  }
}

struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  LaunchConfig(dim3 g, dim3 b, size_t sm = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(sm) {}
};

template <typename... P, typename... A>
void launch(const LaunchConfig& c, void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  const std::function<void()> body = [&]() { std::apply(kernel, params); };
  run_grid(c.grid, c.block, c.smem, reinterpret_cast<const void*>(kernel), body);
}

// First statement of a __launch_bounds__(max_threads) kernel (emu_build.py): a GPU refuses the launch when the
// block is bigger ("too many resources requested"), since registers were allotted for max_threads.
inline void check_launch_bounds(long long max_threads) {
  const dim3& b = S().bdim;
  const long long n = static_cast<long long>(b.x) * b.y * b.z;
  if (n > max_threads)
    fail("a block of " + std::to_string(n) + " threads for a kernel declared __launch_bounds__(" +
         std::to_string(max_threads) + ")");
}

}  // namespace apt_emu

#define threadIdx (::apt_emu::thread_idx())
#define blockIdx (::apt_emu::block_idx())
#define blockDim (::apt_emu::block_dim())
#define gridDim (::apt_emu::grid_dim())

inline void __syncthreads() { ::apt_emu::syncthreads(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffled values are scalars");
  T out;
  ::apt_emu::shfl_xor(mask, &v, &out, sizeof(T), lane_mask, width);
  return out;
}

// fibers switch only at barriers and shuffles, so a read-modify-write is atomic here
template <typename T, typename U>
inline T atomicAdd(T* p, U v) {
  T old = *p;
  *p = static_cast<T>(old + v);
  return old;
}

// ---- the runtime API the launchers call ----
inline const char* cudaGetErrorString(cudaError_t e) {
  static std::string text;
  text = e == cudaSuccess ? std::string("no error") : ::apt_emu::S().last_error_text;
  return text.c_str();
}
inline cudaError_t cudaGetLastError() {
  auto& s = ::apt_emu::S();
  cudaError_t e = s.last_error;
  if (e == cudaSuccess) return e;
  s.last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? 232448 : 0;  // H100/H200: 227 KB
  return cudaSuccess;
}
template <typename K>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, K*) {
  a->sharedSizeBytes = 0;
  return cudaSuccess;
}
template <typename K>
inline cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute a, int v) {
  if (a == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (v < 0 || v > 232448) return cudaErrorInvalidValue;
    ::apt_emu::S().granted[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(v);
  }
  return cudaSuccess;
}
