// MoE top-k routing with GShard-priority expert capacity, dispatch (gather rows into the expert buffer) and
// combine (weighted sum of expert rows back per token), with backwards, on the CPU with OpenMP (design/MOE.md).
// probs (N, E) fp32/fp64 any strides; x / expert rows fp32/fp16/bf16/fp64 any strides for inputs, outputs and
// index tensors (int64) contiguous. cap < 0 = dropless (packed rows sorted by expert). All gathers: no atomics.
#include "common/apt_common.h"
#include "moe/moe_checks.h"
#include "moe/moe_topk.h"

#include <algorithm>
#include <atomic>
#include <vector>

#include "common/apt_cpu_simd.h"
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace apt {
namespace {

// Below this many elements a loop runs on one thread: routing is cheap, and on a loaded machine an OpenMP barrier
// waiting for a descheduled worker costs more than the loop.
constexpr int64_t kParallelWork = int64_t(1) << 18;

using moe::check_contiguous;
using moe::check_index;
using moe::check_capacity;
using moe::ranks_before;

// Output buffers here are large and freshly allocated, so first-touch page faults cost more than the copy itself
// (~4x at 160 MB). Ask for transparent huge pages on the 2 MB-aligned interior (what torch does with
// THP_MEM_ALLOC_ENABLE=1); it only changes paging policy, and is a no-op where THP is off.
void advise_hugepages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 2 * kHuge) return;
  uintptr_t lo = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  uintptr_t hi = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

void advise_output(const TensorView& t) { advise_hugepages(t.data, static_cast<size_t>(t.numel()) * dtype_size(t.dtype)); }

// ---------------------------------------------------------------------------------------------------------------
// routing
// ---------------------------------------------------------------------------------------------------------------

// Top-k by value with ties to the lower index, NaN ranked above every number (moe/moe_topk.h): scan experts in
// order and insert with the strict ranks_before, so an equal value (or a NaN after a NaN) never overtakes one
// already kept. k = 1, 2 (the common routers) keep the running best in registers (topk_rows_small): the general
// loop keeps it in heap vectors, which cost ~80 ns a row at E = 8.
template <typename P, int K>
void topk_rows_small(const TensorView& probs, int64_t* idx) {
  static_assert(K == 1 || K == 2, "k = 1 or 2");
  const int64_t N = probs.size(0), E = probs.size(1);
  const int64_t s0 = probs.stride(0), s1 = probs.stride(1);
  const P* p = probs.ptr<P>();
#pragma omp parallel for schedule(static) if (N * E > kParallelWork)
  for (int64_t n = 0; n < N; ++n) {
    const P* row = p + n * s0;
    P b0 = row[0];
    int64_t e0 = 0;
    if (K == 1) {
      for (int64_t e = 1; e < E; ++e) {
        const P v = row[e * s1];
        const bool up = ranks_before(v, b0);
        b0 = up ? v : b0;
        e0 = up ? e : e0;
      }
      idx[n] = e0;
    } else {
      P b1 = row[s1];
      int64_t e1 = 1;
      if (ranks_before(b1, b0)) {
        std::swap(b0, b1);
        std::swap(e0, e1);
      }
      for (int64_t e = 2; e < E; ++e) {
        const P v = row[e * s1];
        if (!ranks_before(v, b1)) continue;
        if (ranks_before(v, b0)) {
          b1 = b0;
          e1 = e0;
          b0 = v;
          e0 = e;
        } else {
          b1 = v;
          e1 = e;
        }
      }
      idx[2 * n] = e0;
      idx[2 * n + 1] = e1;
    }
  }
}

template <typename P>
void topk_rows(const TensorView& probs, int64_t k, int64_t* idx) {
  if (k == 1) return topk_rows_small<P, 1>(probs, idx);
  if (k == 2 && probs.size(1) >= 2) return topk_rows_small<P, 2>(probs, idx);
  const int64_t N = probs.size(0), E = probs.size(1);
  const int64_t s0 = probs.stride(0), s1 = probs.stride(1);
  const P* p = probs.ptr<P>();
#pragma omp parallel if (N * E > kParallelWork)
  {
    std::vector<P> best_v(k);
    std::vector<int64_t> best_e(k);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      int64_t filled = 0;
      const P* row = p + n * s0;
      for (int64_t e = 0; e < E; ++e) {
        P v = row[e * s1];
        if (filled == k && !ranks_before(v, best_v[k - 1])) continue;
        int64_t i = filled < k ? filled : k - 1;
        while (i > 0 && ranks_before(v, best_v[i - 1])) {
          best_v[i] = best_v[i - 1];
          best_e[i] = best_e[i - 1];
          --i;
        }
        best_v[i] = v;
        best_e[i] = e;
        if (filled < k) ++filled;
      }
      for (int64_t j = 0; j < k; ++j) idx[n * k + j] = best_e[j];
    }
  }
}

// Queue positions in GShard order (rank-major, token-minor) by a blocked prefix sum: per (rank, token block)
// expert counts in parallel, an exclusive scan of those counts in priority order, then each block numbers its own
// assignments starting from its base.
void positions(const int64_t* idx, int64_t N, int64_t E, int64_t k, int64_t cap, int64_t* pos, int64_t* slot,
               int64_t* counts) {
  const int64_t block = std::max<int64_t>(512, (N + 4 * omp_threads() - 1) / (4 * omp_threads()));
  const int64_t nb = (N + block - 1) / block;
  const int64_t units = k * nb;  // unit u = j * nb + b, already in priority order
  std::vector<int64_t> base(static_cast<size_t>(units * E), 0);
  const bool par = N * k > kParallelWork;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t u = 0; u < units; ++u) {
    const int64_t j = u / nb, b = u % nb;
    int64_t* c = base.data() + u * E;
    for (int64_t n = b * block, end = std::min(N, (b + 1) * block); n < end; ++n) ++c[idx[n * k + j]];
  }
  // exclusive scan over units, per expert
  std::vector<int64_t> start(static_cast<size_t>(E), 0);
#pragma omp parallel for schedule(static) if (units * E > kParallelWork)
  for (int64_t e = 0; e < E; ++e) {
    int64_t run = 0;
    for (int64_t u = 0; u < units; ++u) {
      int64_t c = base[u * E + e];
      base[u * E + e] = run;
      run += c;
    }
    counts[e] = run;
  }
  // dropless rows: expert e's segment starts after all earlier experts' assignments
  for (int64_t e = 1; e < E; ++e) start[e] = start[e - 1] + counts[e - 1];
#pragma omp parallel if (par)
  {
    std::vector<int64_t> run(static_cast<size_t>(E));
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t j = u / nb, b = u % nb;
      std::copy(base.begin() + u * E, base.begin() + (u + 1) * E, run.begin());
      for (int64_t n = b * block, end = std::min(N, (b + 1) * block); n < end; ++n) {
        const int64_t e = idx[n * k + j];
        const int64_t p = run[e]++;
        pos[n * k + j] = p;
        slot[n * k + j] = cap < 0 ? start[e] + p : (p < cap ? e * cap + p : -1);
      }
    }
  }
}

void invert_slots(const int64_t* slot, int64_t N, int64_t k, int64_t* tos, int64_t S) {
#pragma omp parallel for schedule(static) if (S > kParallelWork)
  for (int64_t s = 0; s < S; ++s) tos[s] = -1;
#pragma omp parallel for schedule(static) if (N * k > kParallelWork)
  for (int64_t i = 0; i < N * k; ++i)
    if (slot[i] >= 0) tos[slot[i]] = i / k;
}

// ---------------------------------------------------------------------------------------------------------------
// dispatch / combine
// ---------------------------------------------------------------------------------------------------------------

// Indices come from Python: check their range before touching memory (an OpenMP region cannot throw).
void check_range(const int64_t* v, int64_t count, int64_t lo, int64_t hi, const std::string& name) {
  std::atomic<bool> bad{false};
#pragma omp parallel for schedule(static) if (count > kParallelWork)
  for (int64_t i = 0; i < count; ++i)
    if (v[i] < lo || v[i] >= hi) bad.store(true, std::memory_order_relaxed);
  APT_CHECK(!bad.load(), name, ": index out of range [", lo, ", ", hi, ")");
}

template <typename T>
inline void copy_row(T* dst, const T* src, int64_t C, int64_t sstride) {
  if (sstride == 1) {
    std::memcpy(dst, src, static_cast<size_t>(C) * sizeof(T));
  } else {
    for (int64_t c = 0; c < C; ++c) dst[c] = src[c * sstride];
  }
}

// A dispatch buffer past this size goes out with non-temporal stores. Ordinary stores first read each line they
// write, so the buffer crosses the memory bus twice; streaming skips that read. The buffer is then read from
// memory, by the expert GEMM (compute-bound, and the buffer is far past the per-core caches anyway) or combine's
// backward. Measured at N 4K, C 1024, E 8, k 2 fp32 (a 42 MB buffer, 2 threads): dispatch 4.4-4.9 -> 2.8-3.2 ms,
// and dispatch+combine 9.2-9.5 -> 7.2-7.9 ms. Smaller buffers may still be in cache for the GEMM.
constexpr size_t kStreamBytes = size_t(8) << 20;

// dst[0, bytes) = src[0, bytes), or zeros when src is null, with 16-byte streaming stores where dst is aligned.
inline void stream_row(void* dst, const void* src, size_t bytes) {
#if defined(__SSE2__)
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  const size_t head = std::min(bytes, (16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15);
  if (head) {
    if (s) std::memcpy(d, s, head);
    else std::memset(d, 0, head);
  }
  size_t i = head;
  const __m128i zero = _mm_setzero_si128();
  for (; i + 16 <= bytes; i += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i),
                     s ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)) : zero);
  if (i < bytes) {
    if (s) std::memcpy(d + i, s + i, bytes - i);
    else std::memset(d + i, 0, bytes - i);
  }
#else
  if (src) std::memcpy(dst, src, bytes);
  else std::memset(dst, 0, bytes);
#endif
}

template <typename T>
void dispatch_fwd(const TensorView& x, const int64_t* tos, int64_t S, const TensorView& buf) {
  const int64_t C = x.size(1);
  const T* xp = x.ptr<T>();
  T* bp = buf.ptr<T>();
  const size_t row_bytes = static_cast<size_t>(C) * sizeof(T);
  // no elements (C == 0: torch's data pointers of empty tensors are null, and memcpy/memset take no null pointer)
  if (S == 0 || C == 0) return;
  const bool stream = x.stride(1) == 1 && row_bytes * static_cast<size_t>(S) >= kStreamBytes;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t t = tos[s];
      if (stream) stream_row(bp + s * C, t < 0 ? nullptr : xp + t * x.stride(0), row_bytes);
      else if (t < 0) std::memset(static_cast<void*>(bp + s * C), 0, row_bytes);
      else copy_row(bp + s * C, xp + t * x.stride(0), C, x.stride(1));
    }
#if defined(__SSE2__)
    if (stream) _mm_sfence();  // streamed stores are weakly ordered: make them visible before the region's barrier
#endif
  }
}

// ---- the weighted row sum, once per instruction set (moe/moe_cpu_rows.h) -----------------------------------------
namespace generic {
#include "moe/moe_cpu_rows.h"
}  // namespace generic
#ifdef APT_CPU_ISA_BUILDS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "moe/moe_cpu_rows.h"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")
namespace avx512 {
#include "moe/moe_cpu_rows.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

// The row kernels of the widest build this CPU runs; APT_MOE_CPU_ISA=generic|avx2 caps it (read on every call,
// for the tests).
template <typename T>
struct RowKernels {
  void (*sum)(T*, const T* const*, const acc_t<T>*, int, int64_t, int64_t);
  acc_t<T> (*dot)(const T*, int64_t, const T*, int64_t, int64_t);
};

CpuIsa moe_isa() { return best_cpu_isa("APT_MOE_CPU_ISA"); }

template <typename T>
RowKernels<T> row_kernels_for_cpu() {
#ifdef APT_CPU_ISA_BUILDS
  switch (moe_isa()) {
    case CpuIsa::avx512: return {avx512::weighted_row_sum<T>, avx512::row_dot<T>};
    case CpuIsa::avx2: return {avx2::weighted_row_sum<T>, avx2::row_dot<T>};
    default: return {generic::weighted_row_sum<T>, generic::row_dot<T>};
  }
#else
  return {generic::weighted_row_sum<T>, generic::row_dot<T>};
#endif
}

// y[n] = sum over the kept j of w[n, j] * rows[slot[n, j]] (w = 1 when wp is null), one token per iteration.
template <typename T>
void gather_sum(const T* rows, int64_t rstride, int64_t cs, const acc_t<T>* wp, int64_t ws0, int64_t ws1,
                const int64_t* slot, int64_t k, int64_t N, int64_t C, T* yp) {
  using A = acc_t<T>;
  const auto row_sum = row_kernels_for_cpu<T>().sum;
#pragma omp parallel
  {
    std::vector<const T*> src(static_cast<size_t>(k));
    std::vector<A> wt(static_cast<size_t>(k));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      int m = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = slot[n * k + j];
        if (s < 0) continue;
        src[m] = rows + s * rstride;
        wt[m++] = wp ? wp[n * ws0 + j * ws1] : A(1);
      }
      row_sum(yp + n * C, src.data(), wt.data(), m, C, cs);
    }
  }
}

// grad_x[n] = sum over kept j of grad_buf[slot[n, j]]
template <typename T>
void dispatch_bwd(const TensorView& g, const int64_t* slot, int64_t k, const TensorView& gx) {
  gather_sum<T>(g.ptr<T>(), g.stride(0), g.stride(1), nullptr, 0, 0, slot, k, gx.size(0), gx.size(1), gx.ptr<T>());
}

// y[n] = sum over kept j of w[n, j] * out[slot[n, j]]
template <typename T>
void combine_fwd(const TensorView& out, const TensorView& w, const int64_t* slot, int64_t k, const TensorView& y) {
  gather_sum<T>(out.ptr<T>(), out.stride(0), out.stride(1), w.ptr<acc_t<T>>(), w.stride(0), w.stride(1), slot, k,
                y.size(0), y.size(1), y.ptr<T>());
}

// grad_out[s] = w[t, j] * grad_y[t] for the (t, j) held by row s (zero rows stay zero);
// grad_w[n, j] = <grad_y[n], out[slot[n, j]]> for kept j, else 0.
template <typename T>
void combine_bwd(const TensorView& gy, const TensorView& out, const TensorView& w, const int64_t* slot,
                 const int64_t* tos, int64_t k, const TensorView& g_out, const TensorView& g_w) {
  using A = acc_t<T>;
  const int64_t N = gy.size(0), C = gy.size(1), S = out.size(0);
  const T* gp = gy.ptr<T>();
  const T* op = out.ptr<T>();
  const A* wp = w.ptr<A>();
  T* go = g_out.ptr<T>();
  A* gw = g_w.ptr<A>();
  const RowKernels<T> rk = row_kernels_for_cpu<T>();
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < S; ++s) {
    T* dst = go + s * C;
    const int64_t t = tos[s];
    int64_t j = 0;
    if (t >= 0)
      while (j < k && slot[t * k + j] != s) ++j;
    if (t < 0 || j == k) {
      if (C > 0) std::memset(static_cast<void*>(dst), 0, static_cast<size_t>(C) * sizeof(T));  // dst null at C 0
      continue;
    }
    const A wt = wp[t * w.stride(0) + j * w.stride(1)];
    const T* src = gp + t * gy.stride(0);
    rk.sum(dst, &src, &wt, 1, C, gy.stride(1));
  }
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t s = slot[n * k + j];
      gw[n * k + j] =
          s < 0 ? A(0) : rk.dot(gp + n * gy.stride(0), gy.stride(1), op + s * out.stride(0), out.stride(1), C);
    }
  }
}

DType acc_dtype(DType d) { return d == DType::Float64 ? DType::Float64 : DType::Float32; }

}  // namespace

APT_REGISTER_OPS(moe) {
  m.def(
      "moe_cpu_isa", [] { return std::string(cpu_isa_name(moe_isa())); },
      "The instruction-set build of the MoE CPU row kernels now: generic, avx2 or avx512 (APT_MOE_CPU_ISA caps it).");
  m.def(
      "moe_route_cpu",
      [](py::object probs_, int64_t k, int64_t cap, py::object idx_, py::object pos_, py::object slot_,
         py::object tos_, py::object counts_) {
        auto probs = TensorView::from(probs_, "probs");
        auto idx = TensorView::from(idx_, "expert_idx"), pos = TensorView::from(pos_, "position");
        auto slot = TensorView::from(slot_, "slot"), tos = TensorView::from(tos_, "token_of_slot");
        auto counts = TensorView::from(counts_, "tokens_per_expert");
        check_ndim(probs, 2);
        check_cpu(probs);
        APT_CHECK_TYPE(probs.dtype == DType::Float32 || probs.dtype == DType::Float64,
                       "probs: expected float32 or float64, got ", dtype_name(probs.dtype));
        const int64_t N = probs.size(0), E = probs.size(1);
        APT_CHECK(E >= 1, "probs: expected at least one expert");
        APT_CHECK(k >= 1 && k <= E, "k: expected 1 <= k <= num_experts (", E, "), got ", k);
        check_capacity(cap, E);
        check_index(idx, {N, k});
        check_index(pos, {N, k});
        check_index(slot, {N, k});
        check_index(tos, {cap < 0 ? N * k : E * cap});
        check_index(counts, {E});
        py::gil_scoped_release nogil;
        if (probs.dtype == DType::Float32) topk_rows<float>(probs, k, idx.ptr<int64_t>());
        else topk_rows<double>(probs, k, idx.ptr<int64_t>());
        positions(idx.ptr<int64_t>(), N, E, k, cap, pos.ptr<int64_t>(), slot.ptr<int64_t>(), counts.ptr<int64_t>());
        invert_slots(slot.ptr<int64_t>(), N, k, tos.ptr<int64_t>(), tos.size(0));
      },
      py::arg("probs"), py::arg("k"), py::arg("cap"), py::arg("expert_idx"), py::arg("position"), py::arg("slot"),
      py::arg("token_of_slot"), py::arg("tokens_per_expert"),
      "Top-k (ties to the lower expert), GShard-priority queue positions, capacity drops, buffer rows.");
  m.def(
      "moe_dispatch_cpu",
      [](py::object x_, py::object tos_, py::object buf_) {
        auto x = TensorView::from(x_, "x"), tos = TensorView::from(tos_, "token_of_slot");
        auto buf = TensorView::from(buf_, "buf");
        check_ndim(x, 2);
        check_float(x);
        check_cpu(x);
        check_ndim(tos, 1);
        check_index(tos, {tos.size(0)});
        check_shape(buf, {tos.size(0), x.size(1)});
        check_dtype(buf, x.dtype);
        check_cpu(buf);
        check_contiguous(buf);
        py::gil_scoped_release nogil;
        check_range(tos.ptr<int64_t>(), tos.size(0), -1, x.size(0), "token_of_slot");
        advise_output(buf);
        dispatch_float(x.dtype, "x", [&](auto tag) {
          dispatch_fwd<decltype(tag)>(x, tos.ptr<int64_t>(), tos.size(0), buf);
        });
      },
      py::arg("x"), py::arg("token_of_slot"), py::arg("buf"), "buf[s] = x[token_of_slot[s]] (zero when -1).");
  m.def(
      "moe_dispatch_backward_cpu",
      [](py::object g_, py::object slot_, py::object gx_) {
        auto g = TensorView::from(g_, "grad_buf"), slot = TensorView::from(slot_, "slot");
        auto gx = TensorView::from(gx_, "grad_x");
        check_ndim(g, 2);
        check_float(g);
        check_cpu(g);
        check_ndim(slot, 2);
        check_index(slot, slot.shape);
        check_shape(gx, {slot.size(0), g.size(1)});
        check_dtype(gx, g.dtype);
        check_cpu(gx);
        check_contiguous(gx);
        py::gil_scoped_release nogil;
        check_range(slot.ptr<int64_t>(), slot.numel(), -1, g.size(0), "slot");
        advise_output(gx);
        dispatch_float(g.dtype, "grad_buf", [&](auto tag) {
          dispatch_bwd<decltype(tag)>(g, slot.ptr<int64_t>(), slot.size(1), gx);
        });
      },
      py::arg("grad_buf"), py::arg("slot"), py::arg("grad_x"));
  m.def(
      "moe_combine_cpu",
      [](py::object out_, py::object w_, py::object slot_, py::object y_) {
        auto out = TensorView::from(out_, "expert_out"), w = TensorView::from(w_, "weights");
        auto slot = TensorView::from(slot_, "slot"), y = TensorView::from(y_, "y");
        check_ndim(out, 2);
        check_float(out);
        check_cpu(out);
        check_ndim(slot, 2);
        check_index(slot, slot.shape);
        check_shape(w, slot.shape);
        check_dtype(w, acc_dtype(out.dtype));
        check_cpu(w);
        check_shape(y, {slot.size(0), out.size(1)});
        check_dtype(y, out.dtype);
        check_cpu(y);
        check_contiguous(y);
        py::gil_scoped_release nogil;
        check_range(slot.ptr<int64_t>(), slot.numel(), -1, out.size(0), "slot");
        advise_output(y);
        dispatch_float(out.dtype, "expert_out", [&](auto tag) {
          combine_fwd<decltype(tag)>(out, w, slot.ptr<int64_t>(), slot.size(1), y);
        });
      },
      py::arg("expert_out"), py::arg("weights"), py::arg("slot"), py::arg("y"),
      "y[n] = sum over kept j of weights[n, j] * expert_out[slot[n, j]].");
  m.def(
      "moe_combine_backward_cpu",
      [](py::object gy_, py::object out_, py::object w_, py::object slot_, py::object tos_, py::object go_,
         py::object gw_) {
        auto gy = TensorView::from(gy_, "grad_y"), out = TensorView::from(out_, "expert_out");
        auto w = TensorView::from(w_, "weights"), slot = TensorView::from(slot_, "slot");
        auto tos = TensorView::from(tos_, "token_of_slot"), go = TensorView::from(go_, "grad_expert_out");
        auto gw = TensorView::from(gw_, "grad_weights");
        check_ndim(out, 2);
        check_float(out);
        check_cpu(out);
        check_ndim(slot, 2);
        check_index(slot, slot.shape);
        check_index(tos, {out.size(0)});
        check_shape(gy, {slot.size(0), out.size(1)});
        check_dtype(gy, out.dtype);
        check_cpu(gy);
        check_shape(w, slot.shape);
        check_dtype(w, acc_dtype(out.dtype));
        check_cpu(w);
        check_shape(go, out.shape);
        check_dtype(go, out.dtype);
        check_cpu(go);
        check_contiguous(go);
        check_shape(gw, slot.shape);
        check_dtype(gw, w.dtype);
        check_cpu(gw);
        check_contiguous(gw);
        py::gil_scoped_release nogil;
        check_range(slot.ptr<int64_t>(), slot.numel(), -1, out.size(0), "slot");
        check_range(tos.ptr<int64_t>(), tos.numel(), -1, slot.size(0), "token_of_slot");
        advise_output(go);
        dispatch_float(out.dtype, "expert_out", [&](auto tag) {
          combine_bwd<decltype(tag)>(gy, out, w, slot.ptr<int64_t>(), tos.ptr<int64_t>(), slot.size(1), go, gw);
        });
      },
      py::arg("grad_y"), py::arg("expert_out"), py::arg("weights"), py::arg("slot"), py::arg("token_of_slot"),
      py::arg("grad_expert_out"), py::arg("grad_weights"));
}

}  // namespace apt
