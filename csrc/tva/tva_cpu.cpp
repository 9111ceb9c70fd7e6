// Fused TVA attention on the CPU: o = softmax(q kᵀ·scale + mask) v + coef·gate·delta with an online softmax over
// key blocks (never the Tq×Tk matrix), and its backward recomputing P blockwise from the saved log-sum-exp.
// q, delta, o: (B, H, Tq, D); k, v: (B, H, Tk, D); gate (B, Tq, H); pad (B, Tk) bool True = padded; any strides;
// fp32/fp16/bf16 storage, fp32 accumulation. Head dim <= 256. The kernels (tva_cpu_impl.h, built generic / AVX2 /
// AVX-512 and picked at run time) run register-tiled 64×64 block products on dense fp32 blocks, OpenMP over
// batch·heads × blocks. The forward reads q and writes o straight from the views, and reads K and V rows in place
// where their layout allows (decode: in any dtype), else converts each key block inside the task that uses it, or,
// past 8 query blocks, reads K and V from panels packed once per call; the backward packs
// its inputs into panels (O(T·D), padded to whole blocks) and writes dq, dk, dv straight to the views.
// This file also binds the CUDA kernels of tva_cuda.cu (under APT_WITH_CUDA) so the family registers once.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <utility>
#include <vector>

#include "common/apt_common.h"
#include "common/apt_cpu_simd.h"
#include "tva/tva_common.h"
#ifdef APT_CPU_ISA_BUILDS
#include <immintrin.h>  // F16C conversions in the AVX2 / AVX-512 builds
#endif
#ifdef APT_WITH_CUDA
#include "tva/tva_cuda.h"
#endif

namespace apt {
namespace {

using tva::MaskSpec;

constexpr int64_t kBlk = 64;  // query rows and keys per block (the micro-kernels' column count)
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// Strided (b, h, t, d) element of a 4-d view.
template <typename T>
inline T* at4(const TensorView& t, int64_t b, int64_t h, int64_t s, int64_t d) {
  return t.ptr<T>() + b * t.stride(0) + h * t.stride(1) + s * t.stride(2) + d * t.stride(3);
}

inline int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

struct Ctx {
  TensorView q, k, v, delta, gate, pad;
  TensorView attn;  // forward, optional: the attention part A before the perturbation (what the backward reads)
  MaskSpec mask;
  float coef, scale;
  int64_t B, H, Tq, Tk, D;
  bool padded(int64_t b, int64_t j) const {
    return pad.defined() && pad.ptr<bool>()[b * pad.stride(0) + j * pad.stride(1)];
  }
  template <typename T> float gate_at(int64_t b, int64_t i, int64_t h) const {
    if (!gate.defined()) return 1.f;
    return load_f(gate.ptr<T>() + b * gate.stride(0) + i * gate.stride(1) + h * gate.stride(2));
  }
};

// One row of D elements of dtype T (stride sd) times `mul` -> dst, dense fp32
template <typename T>
inline void load_row(const T* src, int64_t sd, int64_t D, float mul, float* dst) {
  if (sd == 1) {
    for (int64_t d = 0; d < D; ++d) dst[d] = load_f(src + d) * mul;
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = load_f(src + d * sd) * mul;
  }
}

// D dense fp32 values times `mul` -> one row of dtype T (stride sd); load_row's inverse
template <typename T>
inline void store_row(const float* src, float mul, int64_t D, T* dst, int64_t sd) {
  if (sd == 1) {
    for (int64_t d = 0; d < D; ++d) store_f(dst + d, src[d] * mul);
  } else {
    for (int64_t d = 0; d < D; ++d) store_f(dst + d * sd, src[d] * mul);
  }
}

// o[b, h, t, :] = a·mul + coef·gate·delta[b, h, t, :] (the perturbation when delta is given); a: D fp32 values.
// With c.attn, a·mul also goes there: the backward's Di = Σ dO·A then needs no A = o - coef·gate·delta, which in
// fp16/bf16 lost A's digits to o's rounding wherever the perturbation outweighs the attention.
template <typename T>
inline void store_output(const Ctx& c, const TensorView& o, int64_t b, int64_t h, int64_t t, const float* a,
                         float mul) {
  T* out = at4<T>(o, b, h, t, 0);
  const int64_t so = o.stride(3), D = c.D;
  if (c.attn.defined()) store_row(a, mul, D, at4<T>(c.attn, b, h, t, 0), c.attn.stride(3));
  if (c.delta.defined()) {
    const float cg = c.coef * c.gate_at<T>(b, t, h);
    const T* dl = at4<T>(c.delta, b, h, t, 0);
    const int64_t sd = c.delta.stride(3);
    for (int64_t d = 0; d < D; ++d) store_f(out + d * so, a[d] * mul + cg * load_f(dl + d * sd));
  } else {
    store_row(a, mul, D, out, so);
  }
}

// Where the backward's kernels write rows of dq, dk or dv: dense fp32 rows (ld apart) times mul -> rows r0 .. r0+n of
// batch·head bh of a (B, H, T, D) view, converted to its dtype. The kernels are built once per ISA, not per dtype:
// the conversion is a call per block of rows, through a function pointer.
struct RowSink {
  using Fn = void (*)(const TensorView& t, int64_t bh, int64_t r0, int64_t n, const float* src, int64_t ld,
                      float mul);
  Fn fn = nullptr;
  const TensorView* t = nullptr;
  void operator()(int64_t bh, int64_t r0, int64_t n, const float* src, int64_t ld, float mul) const {
    fn(*t, bh, r0, n, src, ld, mul);
  }
};

template <typename T>
void store_rows(const TensorView& t, int64_t bh, int64_t r0, int64_t n, const float* src, int64_t ld, float mul) {
  const int64_t H = t.size(1), D = t.size(3);
  for (int64_t r = 0; r < n; ++r) store_row(src + r * ld, mul, D, at4<T>(t, bh / H, bh % H, r0 + r, 0), t.stride(3));
}

template <typename T>
RowSink row_sink(const TensorView& t) {
  RowSink s;
  s.fn = &store_rows<T>;
  s.t = &t;
  return s;
}

// What the kernels of tva_cpu_impl.h read: dense fp32 copies, per batch·head, with the head dim padded to Dp (a
// multiple of 16) and the rows to Tqp/Tkp (multiples of kBlk), zeros in the padding. "t" layouts are transposed
// (Dp × T), so that a block's scores are a product of two row-major panels. q is scaled by the softmax scale.
struct Packed {
  int64_t B, H, Tq, Tk, Dp, Tqp, Tkp;
  MaskSpec mask;
  float scale;
  const float *qp = nullptr, *qt = nullptr, *kp = nullptr, *kt = nullptr, *vp = nullptr, *vt = nullptr;
  const float *gp = nullptr, *gt = nullptr;  // grad_o (backward)
  const float* kbias = nullptr;              // (B, Tkp): 0, or -inf for padded keys and keys past Tk
  bool any_pad = false;
  const float *lse = nullptr, *di = nullptr;  // (BH, Tqp), backward; lse +inf past Tq
  int bwd_split = 0;  // the backward's form: 0 fused, 1 split (tva_bwd decides)
  RowSink dq_out, dk_out, dv_out;  // backward
};

// The whole rectangle of (query position, key) pairs [p0, p1] × [n0, n1] is inside the causal/window band. With
// the sinks ignored the band is convex, so its four corners decide; sinks only add visible pairs.
inline bool band_covers(const MaskSpec& m, int64_t p0, int64_t p1, int64_t n0, int64_t n1) {
  MaskSpec s = m;
  s.sinks = 0;
  return tva::visible(s, p0, n0) && tva::visible(s, p0, n1) && tva::visible(s, p1, n0) && tva::visible(s, p1, n1);
}

// The kernels pass vectors wider than the baseline ABI's only between inlined functions of one build: no ABI
// crosses a build boundary.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
// APT_TVA_ISA tells the included kernels which build they are in (the fp16 loads use F16C in the x86 ones).
#define APT_TVA_ISA 0
namespace generic {
constexpr int kR = 2, kCV = 1, kW = 4;
#include "tva/tva_cpu_impl.h"
}  // namespace generic
#undef APT_TVA_ISA

#ifdef APT_CPU_ISA_BUILDS
#define APT_TVA_ISA 2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
constexpr int kR = 4, kCV = 1, kW = 8;  // 4 rows × 16 columns: 8 ymm accumulators
#include "tva/tva_cpu_impl.h"
}  // namespace avx2
#pragma GCC pop_options
#undef APT_TVA_ISA
#define APT_TVA_ISA 512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")
namespace avx512 {
constexpr int kR = 4, kCV = 4, kW = 16;  // 4 rows × 64 columns: 16 zmm accumulators
#include "tva/tva_cpu_impl.h"
}  // namespace avx512
#pragma GCC pop_options
#undef APT_TVA_ISA
#endif
#pragma GCC diagnostic pop

// APT_TVA_CPU_ISA=generic|avx2 caps the build used (read on every call, for the tests).
CpuIsa tva_isa() { return best_cpu_isa("APT_TVA_CPU_ISA"); }

template <typename T>
void run_forward(const Ctx& c, const Packed& p, const TensorView& o, float* lse) {
  switch (tva_isa()) {
#ifdef APT_CPU_ISA_BUILDS
    case CpuIsa::avx512: avx512::forward<T>(c, p, o, lse); return;
    case CpuIsa::avx2: avx2::forward<T>(c, p, o, lse); return;
#endif
    default: generic::forward<T>(c, p, o, lse);
  }
}

void run_backward(const Packed& p) {
  switch (tva_isa()) {
#ifdef APT_CPU_ISA_BUILDS
    case CpuIsa::avx512: avx512::backward(p); return;
    case CpuIsa::avx2: avx2::backward(p); return;
#endif
    default: generic::backward(p);
  }
}

// One panel job of pack(): a (B, H, T, D) view times `mul` -> packed (BH, Tp, Dp) rows and/or (BH, Dp, Tp)
// transposed columns (either may be null).
struct PackJob {
  const TensorView* t;
  int64_t Tp;
  float mul;
  float* rows;
  float* cols;
};

// Every job's panels, in one parallel region: a task per (job, batch·head, row block) writes its whole block,
// zeros in the padding included (rows past T, head dims past D), so the buffers need no clearing beforehand. Rows
// first, then the block transposed from them.
template <typename T>
void pack(std::initializer_list<PackJob> list, int64_t Dp) {
  const std::vector<PackJob> jobs(list);
  std::vector<int64_t> first(jobs.size() + 1, 0);  // first task of each job
  for (size_t i = 0; i < jobs.size(); ++i) {
    const TensorView& t = *jobs[i].t;
    first[i + 1] = first[i] + t.size(0) * t.size(1) * tva::cdiv(t.size(2), kBlk);
  }
#pragma omp parallel
  {
    std::vector<float> tmp(kBlk * Dp);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < first.back(); ++task) {
      size_t ji = 0;
      while (task >= first[ji + 1]) ++ji;
      const PackJob& jb = jobs[ji];
      const TensorView& t = *jb.t;
      const int64_t H = t.size(1), T_ = t.size(2), D = t.size(3), nb = tva::cdiv(T_, kBlk);
      const int64_t bh = (task - first[ji]) / nb, rb = (task - first[ji]) % nb;
      const int64_t b = bh / H, h = bh % H, r0 = rb * kBlk, n = std::min(kBlk, T_ - r0);
      float* dst = jb.rows ? jb.rows + (bh * jb.Tp + r0) * Dp : tmp.data();
      for (int64_t r = 0; r < kBlk; ++r) {
        float* row = dst + r * Dp;
        if (r < n) {
          load_row(at4<T>(t, b, h, r0 + r, 0), t.stride(3), D, jb.mul, row);
          std::fill(row + D, row + Dp, 0.0f);
        } else {
          std::fill(row, row + Dp, 0.0f);
        }
      }
      if (jb.cols)
        for (int64_t d = 0; d < Dp; ++d) {
          float* o = jb.cols + (bh * Dp + d) * jb.Tp + r0;
          for (int64_t r = 0; r < kBlk; ++r) o[r] = dst[r * Dp + d];
        }
    }
  }
}

// Panels kept between calls, per calling thread. Fresh vectors of this size (past glibc's mmap threshold) are new
// pages on every call, and their page faults took ~60% of a forward at T 512 (B 1, H 8, D 64: 3.6 ms, 1.4 ms with
// the memory kept). Handed out as they are (pack() writes every element); whatever a call leaves above kKeepBytes is
// freed.
class Scratch {
 public:
  static constexpr size_t kKeepBytes = size_t(256) << 20;
  float* get(size_t slot, size_t n) {
    if (bufs_.size() <= slot) bufs_.resize(slot + 1);
    std::vector<float>& b = bufs_[slot];
    if (b.size() < n) b.resize(n);
    return b.data();
  }
  void trim() {
    size_t bytes = 0;
    for (const auto& b : bufs_) bytes += b.capacity() * sizeof(float);
    if (bytes > kKeepBytes) std::vector<std::vector<float>>().swap(bufs_);
  }

 private:
  std::vector<std::vector<float>> bufs_;
};

// This thread's scratch for one call: trimmed when the call ends.
struct ScratchScope {
  Scratch& s;
  ScratchScope() : s(instance()) {}
  ~ScratchScope() { s.trim(); }
  float* get(size_t slot, int64_t n) { return s.get(slot, static_cast<size_t>(n)); }
  static Scratch& instance() {
    thread_local Scratch sc;
    return sc;
  }
};

Packed packed_shape(const Ctx& c, std::vector<float>& kbias) {
  Packed p;
  p.B = c.B; p.H = c.H; p.Tq = c.Tq; p.Tk = c.Tk;
  p.Dp = round_up(c.D, 16);
  p.Tqp = round_up(c.Tq, kBlk);
  p.Tkp = round_up(c.Tk, kBlk);
  p.mask = c.mask;
  p.scale = c.scale;
  kbias.assign(c.B * p.Tkp, NEG_INF);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t j = 0; j < c.Tk; ++j) {
      const bool pad = c.padded(b, j);
      p.any_pad |= pad;
      kbias[b * p.Tkp + j] = pad ? NEG_INF : 0.0f;
    }
  p.kbias = kbias.data();
  return p;
}

// APT_TVA_CPU_PACK=0|1 (read on every call, for the tests) overrides whether the forward packs K and V first.
bool forward_packs_kv(int64_t nmb) {
  if (const char* f = std::getenv("APT_TVA_CPU_PACK")) return std::strcmp(f, "1") == 0;
  // Each key block serves up to nmb query blocks. Converting it inside every task that uses it measured faster
  // than a first pass over the whole of K and V up to 4 query blocks and as fast at 8 (fp32 and bf16, 2 cores);
  // packing pays once a block is reused more often.
  return nmb > 8;
}

template <typename T>
void tva_fwd(const Ctx& c, const TensorView& o, float* lse) {
  if (c.B * c.H * c.Tq == 0) return;
  std::vector<float> kbias;
  Packed p = packed_shape(c, kbias);
  ScratchScope sc;
  if (forward_packs_kv(tva::cdiv(c.Tq, kBlk))) {
    const int64_t BH = c.B * c.H;
    float* kt = sc.get(0, BH * p.Dp * p.Tkp);
    float* vp = sc.get(1, BH * p.Tkp * p.Dp);
    pack<T>({PackJob{&c.k, p.Tkp, 1.0f, nullptr, kt}, PackJob{&c.v, p.Tkp, 1.0f, vp, nullptr}}, p.Dp);
    p.kt = kt;
    p.vp = vp;
  }
  run_forward<T>(c, p, o, lse);
}

template <typename T>
void tva_bwd(const Ctx& c, const TensorView& go, const TensorView& attn, const float* lse, const TensorView& dq,
             const TensorView& dk, const TensorView& dv, const TensorView& ddelta, float* rowdot) {
  const int64_t D = c.D, BH = c.B * c.H;
  if (BH == 0) return;
  std::vector<float> kbias;
  Packed p = packed_shape(c, kbias);
  const int64_t Dp = p.Dp, Tqp = p.Tqp, Tkp = p.Tkp;
  // Di = Σ_d dO·A (A: the attention part of o, saved by the forward); dDelta = coef·gate·dO;
  // rowdot = Σ_d delta·dO; lse padded (+inf)
  std::vector<float> di(BH * Tqp, 0.0f), lsep(BH * Tqp, std::numeric_limits<float>::infinity());
  const bool has_delta = c.delta.defined();
  const int64_t sg = go.stride(3), so = attn.stride(3), sdl = has_delta ? c.delta.stride(3) : 0,
                sdd = has_delta ? ddelta.stride(3) : 0;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t t = 0; t < c.Tq; ++t) {
      const int64_t b = bh / c.H, h = bh % c.H;
      const T* g = at4<T>(go, b, h, t, 0);
      const T* a = at4<T>(attn, b, h, t, 0);
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += load_f(g + d * sg) * load_f(a + d * so);
      if (has_delta) {
        const float cg = c.coef * c.gate_at<T>(b, t, h);
        const T* dl = at4<T>(c.delta, b, h, t, 0);
        T* dd = at4<T>(ddelta, b, h, t, 0);
        float rd = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          const float gv = load_f(g + d * sg);
          rd += load_f(dl + d * sdl) * gv;
          store_f(dd + d * sdd, cg * gv);
        }
        rowdot[bh * c.Tq + t] = rd;
      }
      di[bh * Tqp + t] = s;
      lsep[bh * Tqp + t] = lse[bh * c.Tq + t];
    }
  ScratchScope sc;
  float *qp = sc.get(0, BH * Tqp * Dp), *qt = sc.get(1, BH * Dp * Tqp);
  float *gp = sc.get(2, BH * Tqp * Dp), *gt = sc.get(3, BH * Dp * Tqp);
  // the backward's form (see backward in tva_cpu_impl.h): fused with at least as many batch·heads as threads,
  // evenly shared; APT_TVA_CPU_BWD=fused|split (read on every call, for the tests) overrides
  const int64_t nth = omp_threads();
  bool split = !(BH >= nth && (BH % nth == 0 || BH >= 4 * nth));
  if (const char* f = std::getenv("APT_TVA_CPU_BWD")) split = std::strcmp(f, "split") == 0;
  p.bwd_split = split ? 1 : 0;
  float *kp = sc.get(4, BH * Tkp * Dp), *kt = split ? sc.get(5, BH * Dp * Tkp) : nullptr;
  float *vp = sc.get(6, BH * Tkp * Dp), *vt = split ? sc.get(7, BH * Dp * Tkp) : nullptr;
  pack<T>({PackJob{&c.q, Tqp, c.scale, qp, qt}, PackJob{&go, Tqp, 1.0f, gp, gt}, PackJob{&c.k, Tkp, 1.0f, kp, kt},
           PackJob{&c.v, Tkp, 1.0f, vp, vt}},
          Dp);
  p.qp = qp; p.qt = qt; p.gp = gp; p.gt = gt;
  p.kp = kp; p.kt = kt; p.vp = vp; p.vt = vt;
  p.lse = lsep.data(); p.di = di.data();
  p.dq_out = row_sink<T>(dq);
  p.dk_out = row_sink<T>(dk);
  p.dv_out = row_sink<T>(dv);
  run_backward(p);
}

// ---- argument checks (the Python side validates too; this keeps direct calls from crashing) ----
// on_cuda: the tensors must all live on q's CUDA device instead of the CPU
void check_device(const TensorView& t, bool on_cuda, int device) {
  if (!on_cuda) {
    check_cpu(t);
    return;
  }
  check_cuda(t);
  APT_CHECK(t.device == device, t.name, ": expected cuda:", device, " (same as q), got cuda:", t.device);
}

Ctx make_ctx(py::object q_, py::object k_, py::object v_, py::object delta_, py::object gate_, double coef,
             bool causal, int64_t window, int64_t sinks, py::object pad_, double scale, bool on_cuda = false) {
  Ctx c;
  c.q = TensorView::from(q_, "q");
  c.k = TensorView::from(k_, "k");
  c.v = TensorView::from(v_, "v");
  c.delta = TensorView::from_optional(delta_, "delta");
  c.gate = TensorView::from_optional(gate_, "gate");
  c.pad = TensorView::from_optional(pad_, "key_padding_mask");
  check_ndim(c.q, 4);
  if (on_cuda) check_cuda(c.q); else check_cpu(c.q);
  const int dev = c.q.device;
  APT_CHECK_TYPE(c.q.dtype == DType::Float32 || c.q.dtype == DType::Float16 || c.q.dtype == DType::BFloat16,
                 "q: expected float32/float16/bfloat16, got ", dtype_name(c.q.dtype));
  c.B = c.q.size(0); c.H = c.q.size(1); c.Tq = c.q.size(2); c.D = c.q.size(3);
  check_ndim(c.k, 4);
  c.Tk = c.k.size(2);
  APT_CHECK(c.D >= 1 && c.D <= 256, "q: head dim must be in [1, 256], got ", c.D);
  APT_CHECK(c.Tq <= c.Tk, "q: expected Tq <= Tk, got ", c.Tq, " > ", c.Tk);
  for (const TensorView* t : {&c.k, &c.v}) {
    check_shape(*t, {c.B, c.H, c.Tk, c.D});
    check_dtype(*t, c.q.dtype);
    check_device(*t, on_cuda, dev);
  }
  if (c.delta.defined()) {
    check_shape(c.delta, {c.B, c.H, c.Tq, c.D});
    check_dtype(c.delta, c.q.dtype);
    check_device(c.delta, on_cuda, dev);
  }
  if (c.gate.defined()) {
    APT_CHECK(c.delta.defined(), "gate: given without delta");
    check_shape(c.gate, {c.B, c.Tq, c.H});
    check_dtype(c.gate, c.q.dtype);
    check_device(c.gate, on_cuda, dev);
  }
  if (c.pad.defined()) {
    check_shape(c.pad, {c.B, c.Tk});
    check_dtype(c.pad, DType::Bool);
    check_device(c.pad, on_cuda, dev);
  }
  APT_CHECK(window >= 0, "window: expected >= 0 (0 = none), got ", window);
  APT_CHECK(sinks >= 0, "sinks: expected >= 0, got ", sinks);
  APT_CHECK(scale > 0, "softmax_scale: expected > 0, got ", scale);
  // a window covering every key (|p - j| <= Tk - 1 < window) is no window; a "no window" sentinel such as
  // 2**31 - 1 or INT64_MAX overflowed p + window in the block ranges and hid keys in non-causal mode
  if (window >= c.Tk) window = 0;
  c.mask = MaskSpec{c.Tq, c.Tk, window, sinks, causal};
  c.coef = static_cast<float>(coef);
  c.scale = static_cast<float>(scale);
  return c;
}

void check_out(const TensorView& t, const std::vector<int64_t>& shape, DType dt, bool on_cuda = false,
               int device = -1) {
  check_shape(t, shape);
  check_dtype(t, dt);
  check_device(t, on_cuda, device);
}

// an output the kernel writes: check_out, and no two elements sharing memory (racing writes to one address)
void check_written(const TensorView& t, const std::vector<int64_t>& shape, DType dt, bool on_cuda = false,
                   int device = -1) {
  check_out(t, shape, dt, on_cuda, device);
  check_no_overlap(t, "is an output");
}

void check_contiguous3(const TensorView& t, const Ctx& c) {
  if (c.B * c.H * c.Tq == 0) return;  // torch gives empty tensors strides like (H, 1, 1): nothing is indexed
  APT_CHECK(t.stride(2) == 1 && t.stride(1) == c.Tq && t.stride(0) == c.H * c.Tq, t.name,
            ": expected a contiguous tensor");
}

#ifdef APT_WITH_CUDA
void copy4(int64_t* dst, const TensorView& t) {
  for (int i = 0; i < 4; ++i) dst[i] = t.stride(i);
}

tva::CudaParams cuda_params(const Ctx& c, const TensorView& coef) {
  check_shape(coef, {});
  check_dtype(coef, DType::Float32);
  check_device(coef, true, c.q.device);
  tva::CudaParams p;
  p.dtype = static_cast<int>(c.q.dtype);
  p.device = c.q.device;
  p.B = c.B; p.H = c.H; p.Tq = c.Tq; p.Tk = c.Tk; p.D = c.D;
  p.window = c.mask.window; p.sinks = c.mask.sinks; p.causal = c.mask.causal; p.scale = c.scale;
  APT_CHECK(c.D == 32 || c.D == 64 || c.D == 128, "q: the TVA CUDA kernels take head dims 32, 64, 128, got ", c.D);
  p.q = c.q.data; p.k = c.k.data; p.v = c.v.data;
  copy4(p.sq, c.q); copy4(p.sk, c.k); copy4(p.sv, c.v);
  if (c.delta.defined()) { p.delta = c.delta.data; copy4(p.sdl, c.delta); }
  if (c.gate.defined()) {
    p.gate = c.gate.data;
    for (int i = 0; i < 3; ++i) p.sg[i] = c.gate.stride(i);
  }
  if (c.pad.defined()) {
    p.pad = c.pad.ptr<bool>();
    p.sp[0] = c.pad.stride(0); p.sp[1] = c.pad.stride(1);
  }
  p.coef = coef.ptr<float>();
  return p;
}
#endif

}  // namespace

APT_REGISTER_OPS(tva) {
  m.def(
      "tva_cpu_isa", [] { return std::string(cpu_isa_name(tva_isa())); },
      "The instruction-set build tva_*_cpu run now: generic, avx2 or avx512 (APT_TVA_CPU_ISA caps it).");
  m.def(
      "tva_forward_cpu",
      [](py::object q, py::object k, py::object v, py::object delta, py::object gate, double coef, bool causal,
         int64_t window, int64_t sinks, py::object pad, double scale, py::object o_, py::object lse_,
         py::object attn_) {
        Ctx c = make_ctx(q, k, v, delta, gate, coef, causal, window, sinks, pad, scale);
        auto o = TensorView::from(o_, "o"), lse = TensorView::from(lse_, "lse");
        check_written(o, {c.B, c.H, c.Tq, c.D}, c.q.dtype);
        check_out(lse, {c.B, c.H, c.Tq}, DType::Float32);
        check_contiguous3(lse, c);
        c.attn = TensorView::from_optional(attn_, "attn");
        if (c.attn.defined()) {
          check_written(c.attn, {c.B, c.H, c.Tq, c.D}, c.q.dtype);
          APT_CHECK(c.B * c.H * c.Tq * c.D == 0 || c.attn.data != o.data, "attn: must not be o");
        }
        py::gil_scoped_release nogil;
        dispatch_float(c.q.dtype, "q", [&](auto tag) {
          using T = decltype(tag);
          if constexpr (!std::is_same_v<T, double>) tva_fwd<T>(c, o, lse.ptr<float>());
        });
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("delta"), py::arg("gate"), py::arg("coef"),
      py::arg("causal"), py::arg("window"), py::arg("sinks"), py::arg("key_padding_mask"), py::arg("scale"),
      py::arg("o"), py::arg("lse"), py::arg("attn") = py::none(),
      "Fused TVA attention forward: writes o and the row log-sum-exp (+inf for rows with no visible key); with "
      "attn, also the attention part softmax(q kᵀ) v before the perturbation (the backward's input).");
  m.def(
      "tva_backward_cpu",
      [](py::object grad_o_, py::object q, py::object k, py::object v, py::object attn_, py::object lse_,
         py::object delta, py::object gate, double coef, bool causal, int64_t window, int64_t sinks, py::object pad,
         double scale, py::object dq_, py::object dk_, py::object dv_, py::object ddelta_, py::object rowdot_) {
        Ctx c = make_ctx(q, k, v, delta, gate, coef, causal, window, sinks, pad, scale);
        auto go = TensorView::from(grad_o_, "grad_o"), attn = TensorView::from(attn_, "attn");
        auto lse = TensorView::from(lse_, "lse");
        auto dq = TensorView::from(dq_, "dq"), dk = TensorView::from(dk_, "dk"), dv = TensorView::from(dv_, "dv");
        auto ddelta = TensorView::from_optional(ddelta_, "ddelta");
        auto rowdot = TensorView::from_optional(rowdot_, "rowdot");
        check_out(go, {c.B, c.H, c.Tq, c.D}, c.q.dtype);
        check_out(attn, {c.B, c.H, c.Tq, c.D}, c.q.dtype);
        check_out(lse, {c.B, c.H, c.Tq}, DType::Float32);
        check_contiguous3(lse, c);
        check_written(dq, {c.B, c.H, c.Tq, c.D}, c.q.dtype);
        check_written(dk, {c.B, c.H, c.Tk, c.D}, c.q.dtype);
        check_written(dv, {c.B, c.H, c.Tk, c.D}, c.q.dtype);
        if (c.delta.defined()) {
          APT_CHECK(ddelta.defined() && rowdot.defined(), "ddelta: required (with rowdot) when delta is given");
          check_written(ddelta, {c.B, c.H, c.Tq, c.D}, c.q.dtype);
          check_out(rowdot, {c.B, c.H, c.Tq}, DType::Float32);
          check_contiguous3(rowdot, c);
        }
        py::gil_scoped_release nogil;
        dispatch_float(c.q.dtype, "q", [&](auto tag) {
          using T = decltype(tag);
          if constexpr (!std::is_same_v<T, double>)
            tva_bwd<T>(c, go, attn, lse.ptr<float>(), dq, dk, dv, ddelta,
                       c.delta.defined() ? rowdot.ptr<float>() : nullptr);
        });
      },
      py::arg("grad_o"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("attn"), py::arg("lse"), py::arg("delta"),
      py::arg("gate"), py::arg("coef"), py::arg("causal"), py::arg("window"), py::arg("sinks"),
      py::arg("key_padding_mask"), py::arg("scale"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
      py::arg("ddelta"), py::arg("rowdot"),
      "Fused TVA attention backward from the saved LSE and attention part attn (the forward's attn): dq, dk, dv, "
      "ddelta = coef·gate·dO, rowdot = Σ_d delta·dO.");
#ifdef APT_WITH_CUDA
  m.def(
      "tva_forward_cuda",
      [](py::object q, py::object k, py::object v, py::object delta, py::object gate, py::object coef_, bool causal,
         int64_t window, int64_t sinks, py::object pad, double scale, py::object o_, py::object lse_,
         py::object attn_, uintptr_t stream) {
        Ctx c = make_ctx(q, k, v, delta, gate, 0.0, causal, window, sinks, pad, scale, true);
        auto coef = TensorView::from(coef_, "coef");
        auto o = TensorView::from(o_, "o"), lse = TensorView::from(lse_, "lse");
        check_written(o, {c.B, c.H, c.Tq, c.D}, c.q.dtype, true, c.q.device);
        check_out(lse, {c.B, c.H, c.Tq}, DType::Float32, true, c.q.device);
        check_contiguous3(lse, c);
        auto attn = TensorView::from_optional(attn_, "attn");
        tva::CudaParams p = cuda_params(c, coef);
        p.o = o.data;
        copy4(p.so, o);
        if (attn.defined()) {
          check_written(attn, {c.B, c.H, c.Tq, c.D}, c.q.dtype, true, c.q.device);
          APT_CHECK(c.B * c.H * c.Tq * c.D == 0 || attn.data != o.data, "attn: must not be o");
          p.attn = attn.data;
          copy4(p.sa, attn);
        }
        p.lse = lse.ptr<float>();
        py::gil_scoped_release nogil;
        tva::tva_forward_cuda(p, stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("delta"), py::arg("gate"), py::arg("coef"),
      py::arg("causal"), py::arg("window"), py::arg("sinks"), py::arg("key_padding_mask"), py::arg("scale"),
      py::arg("o"), py::arg("lse"), py::arg("attn"), py::arg("stream"),
      "Fused TVA attention forward on CUDA (coef: 0-dim fp32 device tensor), on the given stream; attn (or None) "
      "as tva_forward_cpu's.");
  m.def(
      "tva_backward_cuda",
      [](py::object grad_o_, py::object q, py::object k, py::object v, py::object attn_, py::object lse_,
         py::object delta, py::object gate, py::object coef_, bool causal, int64_t window, int64_t sinks,
         py::object pad, double scale, py::object dq_, py::object dk_, py::object dv_, py::object ddelta_,
         py::object rowdot_, py::object di_, uintptr_t stream) {
        Ctx c = make_ctx(q, k, v, delta, gate, 0.0, causal, window, sinks, pad, scale, true);
        auto coef = TensorView::from(coef_, "coef");
        auto go = TensorView::from(grad_o_, "grad_o"), attn = TensorView::from(attn_, "attn");
        auto lse = TensorView::from(lse_, "lse");
        auto dq = TensorView::from(dq_, "dq"), dk = TensorView::from(dk_, "dk"), dv = TensorView::from(dv_, "dv");
        auto ddelta = TensorView::from_optional(ddelta_, "ddelta");
        auto rowdot = TensorView::from_optional(rowdot_, "rowdot");
        auto di = TensorView::from(di_, "di");
        const int dev = c.q.device;
        check_out(go, {c.B, c.H, c.Tq, c.D}, c.q.dtype, true, dev);
        check_out(attn, {c.B, c.H, c.Tq, c.D}, c.q.dtype, true, dev);
        check_out(lse, {c.B, c.H, c.Tq}, DType::Float32, true, dev);
        check_contiguous3(lse, c);
        check_written(dq, {c.B, c.H, c.Tq, c.D}, c.q.dtype, true, dev);
        check_written(dk, {c.B, c.H, c.Tk, c.D}, c.q.dtype, true, dev);
        check_written(dv, {c.B, c.H, c.Tk, c.D}, c.q.dtype, true, dev);
        check_out(di, {c.B, c.H, c.Tq}, DType::Float32, true, dev);
        check_contiguous3(di, c);
        tva::CudaParams p = cuda_params(c, coef);
        p.di = di.ptr<float>();
        if (c.delta.defined()) {
          APT_CHECK(ddelta.defined() && rowdot.defined(), "ddelta: required (with rowdot) when delta is given");
          check_written(ddelta, {c.B, c.H, c.Tq, c.D}, c.q.dtype, true, dev);
          check_out(rowdot, {c.B, c.H, c.Tq}, DType::Float32, true, dev);
          check_contiguous3(rowdot, c);
          p.ddelta = ddelta.data;
          copy4(p.sdd, ddelta);
          p.rowdot = rowdot.ptr<float>();
        }
        p.attn = attn.data;
        copy4(p.sa, attn);
        p.lse = lse.ptr<float>();
        p.go = go.data;
        copy4(p.sgo, go);
        p.dq = dq.data; p.dk = dk.data; p.dv = dv.data;
        copy4(p.sdq, dq); copy4(p.sdk, dk); copy4(p.sdv, dv);
        py::gil_scoped_release nogil;
        tva::tva_backward_cuda(p, stream);
      },
      py::arg("grad_o"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("attn"), py::arg("lse"), py::arg("delta"),
      py::arg("gate"), py::arg("coef"), py::arg("causal"), py::arg("window"), py::arg("sinks"),
      py::arg("key_padding_mask"), py::arg("scale"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
      py::arg("ddelta"), py::arg("rowdot"), py::arg("di"), py::arg("stream"),
      "Fused TVA attention backward on CUDA from the saved LSE (see tva_backward_cpu); di: (B, H, Tq) fp32 "
      "scratch.");
#endif
}

}  // namespace apt
