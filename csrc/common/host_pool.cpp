// A caching pool for large host (CPU) output tensors, handed to torch through DLPack.
//
// Why: torch's CPU allocator returns every large block to the OS (glibc maps blocks over 32 MB afresh each time),
// so each call that writes a fresh large output first pays the kernel's page faults and page zeroing. For the MoE
// dispatch buffer that is as long as the copy itself. Blocks here stay mapped between calls, as the CUDA caching
// allocator's do. Torch owns each tensor's lifetime: the DLPack deleter, which runs when torch frees the storage
// (on any thread), gives the block back, so reuse never depends on guessing whether a tensor is still referenced.
//
// Bounded: blocks held free are capped at `limit` bytes (the oldest freed go back to the OS first); blocks in use
// are the caller's memory, as with torch.empty. Sizes are rounded to 64 KiB (2 MiB from 8 MiB on, aligned for
// transparent huge pages), and a free block serves a request only when it is at most 25% larger than needed.
#include "common/apt_common.h"

#include <cstdlib>
#include <limits>
#include <mutex>

#ifdef __linux__
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace apt {
namespace {

// ---- the DLPack ABI (dlpack.h, v0.8 "dltensor" capsules), written out: we take no header dependency ----
struct DLDevice { int32_t device_type; int32_t device_id; };
struct DLDataType { uint8_t code; uint8_t bits; uint16_t lanes; };
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
constexpr int32_t kDLCPU = 1;
constexpr uint8_t kDLInt = 0, kDLFloat = 2, kDLBool = 6, kDLBfloat = 4;

constexpr size_t kSmallGrain = size_t(64) << 10;  // 64 KiB
constexpr size_t kHuge = size_t(2) << 20;         // 2 MiB: a transparent huge page
constexpr size_t kHugeFrom = size_t(8) << 20;

size_t round_size(size_t n) {
  const size_t g = n >= kHugeFrom ? kHuge : kSmallGrain;
  return (n + g - 1) / g * g;
}

struct Block { void* ptr; size_t size; };

class HostPool {
 public:
  static HostPool& get() {
    // Leaked on purpose: tensors may outlive static destruction at interpreter exit, and their deleters call here.
    static HostPool* pool = new HostPool();
    return *pool;
  }

  void* acquire(size_t need, size_t* got) {
    const size_t want = round_size(need);
    {
      std::lock_guard<std::mutex> lock(mu_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i) {
        const size_t s = free_[i].size;
        if (s >= want && s - want <= want / 4 && (best == free_.size() || s < free_[best].size)) best = i;
      }
      if (best != free_.size()) {
        Block b = free_[best];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        cached_ -= b.size;
        in_use_ += b.size;
        ++hits_;
        *got = b.size;
        return b.ptr;
      }
      ++misses_;
    }
    const size_t align = want >= kHugeFrom ? kHuge : 4096;
    void* p = std::aligned_alloc(align, want);
    if (p == nullptr) {
      // Free what we hold and try once more before giving up.
      release_cached(0);
      p = std::aligned_alloc(align, want);
      if (p == nullptr) throw std::bad_alloc();
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (want >= kHugeFrom) madvise(p, want, MADV_HUGEPAGE);  // paging policy only; a no-op where THP is off
#endif
    std::lock_guard<std::mutex> lock(mu_);
    in_use_ += want;
    *got = want;
    return p;
  }

  void give_back(void* p, size_t size) {
    std::unique_lock<std::mutex> lock(mu_);
    in_use_ -= size;
    if (size > limit_) {
      lock.unlock();
      std::free(p);
      return;
    }
    free_.push_back({p, size});  // free_ stays in the order blocks were freed: oldest first
    cached_ += size;
    std::vector<void*> drop = evict_locked(limit_);
    lock.unlock();
    for (void* q : drop) std::free(q);
  }

  // Frees held blocks (oldest first) until at most `keep` bytes stay cached.
  void release_cached(size_t keep) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop = evict_locked(keep);
    }
    for (void* q : drop) std::free(q);
  }

  void set_limit(size_t limit) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      limit_ = limit;
    }
    release_cached(limit);
  }

  py::dict stats() {
    size_t limit, cached, blocks, in_use;
    uint64_t hits, misses;
    {
      std::lock_guard<std::mutex> lock(mu_);
      limit = limit_, cached = cached_, blocks = free_.size(), in_use = in_use_, hits = hits_, misses = misses_;
    }
    // Python objects are made after the lock is released: allocating one can run the garbage collector, which can
    // free a pooled tensor, whose deleter (give_back) takes mu_ on this same thread: a deadlock.
    py::dict d;
    d["limit_bytes"] = limit;
    d["cached_bytes"] = cached;
    d["cached_blocks"] = blocks;
    d["in_use_bytes"] = in_use;
    d["hits"] = hits;
    d["misses"] = misses;
    return d;
  }

  // fork(): a child must not inherit the mutex held by a parent thread that was inside the pool.
  void lock_for_fork() { mu_.lock(); }
  void unlock_after_fork() { mu_.unlock(); }

 private:
  HostPool() {
#ifdef __linux__
    pthread_atfork([] { HostPool::get().lock_for_fork(); }, [] { HostPool::get().unlock_after_fork(); },
                   [] { HostPool::get().unlock_after_fork(); });
#endif
  }

  std::vector<void*> evict_locked(size_t keep) {
    std::vector<void*> drop;
    size_t n = 0;  // the oldest are at the front
    for (; n < free_.size() && cached_ > keep; ++n) {
      drop.push_back(free_[n].ptr);
      cached_ -= free_[n].size;
    }
    free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(n));
    return drop;
  }

  std::mutex mu_;
  std::vector<Block> free_;
  size_t limit_ = size_t(1) << 30;
  size_t cached_ = 0, in_use_ = 0;
  uint64_t hits_ = 0, misses_ = 0;
};

struct Managed {
  DLManagedTensor dl;
  std::vector<int64_t> shape, strides;
  size_t block_size;
};

void delete_managed(DLManagedTensor* t) {
  auto* m = static_cast<Managed*>(t->manager_ctx);
  HostPool::get().give_back(t->dl_tensor.data, m->block_size);
  delete m;
}

// torch renames a capsule it consumed to "used_dltensor" and calls the deleter itself when the storage dies.
void capsule_destructor(PyObject* cap) {
  if (PyCapsule_IsValid(cap, "dltensor")) {
    auto* dl = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
    if (dl != nullptr && dl->deleter != nullptr) dl->deleter(dl);
  }
}

DLDataType dl_dtype(DType d) {
  switch (d) {
    case DType::Float32: return {kDLFloat, 32, 1};
    case DType::Float16: return {kDLFloat, 16, 1};
    case DType::BFloat16: return {kDLBfloat, 16, 1};
    case DType::Float64: return {kDLFloat, 64, 1};
    case DType::Int64: return {kDLInt, 64, 1};
    case DType::Int32: return {kDLInt, 32, 1};
    case DType::Bool: return {kDLBool, 8, 1};
  }
  throw py::type_error("host_empty: unknown dtype code");
}

// A contiguous (row-major) tensor of `shape` and `dtype` on pooled memory, as a "dltensor" capsule for
// torch.from_dlpack. An unconsumed capsule (never passed to torch) frees its block when collected.
py::capsule host_empty(const std::vector<int64_t>& shape, int dtype_code) {
  APT_CHECK_TYPE(dtype_code >= 0 && dtype_code <= static_cast<int>(DType::Bool), "dtype: unknown dtype code ",
                 dtype_code);
  const DType dtype = static_cast<DType>(dtype_code);
  // sizes are checked for overflow: a wrapped product handed torch a small block with a huge shape, and torch
  // aborted the process ("Storage size calculation overflowed") instead of raising
  size_t numel = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    APT_CHECK(shape[i] >= 0, "shape: negative size in dim ", i);
    APT_CHECK(!__builtin_mul_overflow(numel, static_cast<size_t>(shape[i]), &numel),
              "shape: the number of elements overflows 64 bits");
  }
  size_t nbytes = 0;
  APT_CHECK(!__builtin_mul_overflow(numel, dtype_size(dtype), &nbytes) &&
                nbytes <= static_cast<size_t>(std::numeric_limits<int64_t>::max()),
            "shape: the tensor's size in bytes overflows int64");
  nbytes = std::max<size_t>(nbytes, 1);
  auto* m = new Managed();
  m->shape = shape;
  m->strides.assign(shape.size(), 1);
  for (size_t i = shape.size(); i-- > 1;) {
    if (__builtin_mul_overflow(m->strides[i], std::max<int64_t>(shape[i], 1), &m->strides[i - 1])) {
      delete m;  // an empty tensor whose other dims multiply past int64 (its element count is 0)
      APT_CHECK(false, "shape: the strides overflow int64");
    }
  }
  void* data = nullptr;
  try {
    data = HostPool::get().acquire(nbytes, &m->block_size);
  } catch (...) {
    delete m;
    throw;
  }
  DLTensor& t = m->dl.dl_tensor;
  t.data = data;
  t.device = {kDLCPU, 0};
  t.ndim = static_cast<int32_t>(shape.size());
  t.dtype = dl_dtype(dtype);
  t.shape = m->shape.data();
  t.strides = m->strides.data();
  t.byte_offset = 0;
  m->dl.manager_ctx = m;
  m->dl.deleter = delete_managed;
  return py::capsule(&m->dl, "dltensor", &capsule_destructor);
}

}  // namespace

APT_REGISTER_OPS(host_pool) {
  m.def("host_empty", &host_empty, py::arg("shape"), py::arg("dtype"),
        "A contiguous CPU tensor on the pooled blocks, as a DLPack capsule (torch.from_dlpack).");
  m.def("host_pool_stats", []() { return HostPool::get().stats(); },
        "limit_bytes, cached_bytes, cached_blocks, in_use_bytes, hits, misses.");
  m.def("host_pool_set_limit", [](int64_t limit) {
    APT_CHECK(limit >= 0, "limit: expected bytes >= 0, got ", limit);
    HostPool::get().set_limit(static_cast<size_t>(limit));
  }, py::arg("limit"), "Caps the bytes held free (0: hold none); frees held blocks beyond it.");
  m.def("host_pool_empty_cache", []() { HostPool::get().release_cached(0); },
        "Frees every held block (blocks in use are freed when torch frees their tensors).");
}

}  // namespace apt
