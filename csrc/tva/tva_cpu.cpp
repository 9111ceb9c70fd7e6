// Fused TVA attention on the CPU: o = softmax(q kᵀ·scale + mask) v + coef·gate·delta with an online softmax over
// key blocks (never the Tq×Tk matrix), and its backward recomputing P blockwise from the saved log-sum-exp.
// q, delta, o: (B, H, Tq, D); k, v: (B, H, Tk, D); gate (B, Tq, H); pad (B, Tk) bool True = padded; any strides;
// fp32/fp16/bf16 storage, fp32 accumulation. OpenMP over batch × heads × blocks. Head dim <= 256.
// This file also binds the CUDA kernels of tva_cuda.cu (under APT_WITH_CUDA) so the family registers once.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/apt_common.h"
#include "tva/tva_common.h"
#ifdef APT_WITH_CUDA
#include "tva/tva_cuda.h"
#endif

namespace apt {
namespace {

using tva::MaskSpec;

constexpr int64_t BM = 64;  // query rows per block
constexpr int64_t BN = 64;  // keys per block
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// ---- fp32 micro-kernels: every inner loop is an axpy over a contiguous row, so it vectorises ----
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define APT_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define APT_SIMD_CLONES
#endif

// C (m×n) = A (m×D) · Bt (D×n)
APT_SIMD_CLONES void mm_nt(const float* A, const float* Bt, float* C, int64_t m, int64_t n, int64_t D) {
  for (int64_t i = 0; i < m; ++i) {
    float* c = C + i * n;
    for (int64_t j = 0; j < n; ++j) c[j] = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      const float a = A[i * D + d];
      const float* b = Bt + d * n;
      for (int64_t j = 0; j < n; ++j) c[j] += a * b[j];
    }
  }
}

// C (m×D) += P (m×n) · V (n×D)
APT_SIMD_CLONES void mm_acc(const float* P, const float* V, float* C, int64_t m, int64_t n, int64_t D) {
  for (int64_t i = 0; i < m; ++i) {
    float* c = C + i * D;
    for (int64_t j = 0; j < n; ++j) {
      const float p = P[i * n + j];
      if (p == 0.f) continue;
      const float* v = V + j * D;
      for (int64_t d = 0; d < D; ++d) c[d] += p * v[d];
    }
  }
}

// C (n×D) += Pᵀ (n×m) · X (m×D)
APT_SIMD_CLONES void mm_tn_acc(const float* P, const float* X, float* C, int64_t m, int64_t n, int64_t D) {
  for (int64_t i = 0; i < m; ++i) {
    const float* x = X + i * D;
    for (int64_t j = 0; j < n; ++j) {
      const float p = P[i * n + j];
      if (p == 0.f) continue;
      float* c = C + j * D;
      for (int64_t d = 0; d < D; ++d) c[d] += p * x[d];
    }
  }
}

// Strided (b, h, t, d) element of a 4-d view.
template <typename T>
inline const T* at4(const TensorView& t, int64_t b, int64_t h, int64_t s, int64_t d) {
  return t.ptr<T>() + b * t.stride(0) + h * t.stride(1) + s * t.stride(2) + d * t.stride(3);
}
template <typename T>
inline T* at4w(const TensorView& t, int64_t b, int64_t h, int64_t s, int64_t d) {
  return t.ptr<T>() + b * t.stride(0) + h * t.stride(1) + s * t.stride(2) + d * t.stride(3);
}

// rows [r0, r0+n) of a (B, H, T, D) view -> dense fp32 (n×D), or transposed (D×n)
template <typename T>
void load_rows(const TensorView& t, int64_t b, int64_t h, int64_t r0, int64_t n, float* out, bool transpose) {
  const int64_t D = t.size(3);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t d = 0; d < D; ++d) {
      float x = load_f(at4<T>(t, b, h, r0 + r, d));
      if (transpose) out[d * n + r] = x; else out[r * D + d] = x;
    }
}

struct Ctx {
  TensorView q, k, v, delta, gate, pad;
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

// S (bm×bn) *= scale, masked entries -> -inf
void mask_scores(const Ctx& c, int64_t b, int64_t m0, int64_t bm, int64_t n0, int64_t bn, float* S) {
  const int64_t off = c.Tk - c.Tq;
  for (int64_t i = 0; i < bm; ++i) {
    const int64_t p = m0 + i + off;
    for (int64_t j = 0; j < bn; ++j) {
      const int64_t kj = n0 + j;
      bool ok = tva::visible(c.mask, p, kj) && !c.padded(b, kj);
      S[i * bn + j] = ok ? S[i * bn + j] * c.scale : NEG_INF;
    }
  }
}

template <typename T>
void tva_fwd(const Ctx& c, const TensorView& o, float* lse) {
  const int64_t nmb = tva::cdiv(c.Tq, BM), D = c.D;
#pragma omp parallel for collapse(3) schedule(dynamic)
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t mb = 0; mb < nmb; ++mb) {
        const int64_t m0 = mb * BM, bm = std::min(BM, c.Tq - m0);
        std::vector<float> Q(bm * D), Kt(D * BN), V(BN * D), S(bm * BN), acc(bm * D, 0.f);
        std::vector<float> mrow(bm, NEG_INF), lrow(bm, 0.f);
        load_rows<T>(c.q, b, h, m0, bm, Q.data(), false);
        auto kb = tva::key_blocks(c.mask, m0, bm, BN);
        for (int64_t it = 0; it < kb.count(); ++it) {
          const int64_t n0 = kb.start(it, BN), bn = std::min(BN, c.Tk - n0);
          load_rows<T>(c.k, b, h, n0, bn, Kt.data(), true);
          load_rows<T>(c.v, b, h, n0, bn, V.data(), false);
          mm_nt(Q.data(), Kt.data(), S.data(), bm, bn, D);
          mask_scores(c, b, m0, bm, n0, bn, S.data());
          for (int64_t i = 0; i < bm; ++i) {
            float* s = S.data() + i * bn;
            float mx = mrow[i];
            for (int64_t j = 0; j < bn; ++j) mx = std::max(mx, s[j]);
            // no visible key yet: keep acc/l at 0 and avoid (-inf) - (-inf)
            const float msafe = mx == NEG_INF ? 0.f : mx;
            const float alpha = std::exp(mrow[i] - msafe);
            float sum = 0.f;
            for (int64_t j = 0; j < bn; ++j) { s[j] = std::exp(s[j] - msafe); sum += s[j]; }
            lrow[i] = lrow[i] * alpha + sum;
            float* a = acc.data() + i * D;
            for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
            mrow[i] = mx;
          }
          mm_acc(S.data(), V.data(), acc.data(), bm, bn, D);
        }
        for (int64_t i = 0; i < bm; ++i) {
          const int64_t t = m0 + i;
          const bool empty = lrow[i] == 0.f;
          const float inv = empty ? 0.f : 1.f / lrow[i];
          float cg = 0.f;
          if (c.delta.defined()) cg = c.coef * c.gate_at<T>(b, t, h);
          for (int64_t d = 0; d < D; ++d) {
            float val = acc[i * D + d] * inv;
            if (c.delta.defined()) val += cg * load_f(at4<T>(c.delta, b, h, t, d));
            store_f(at4w<T>(o, b, h, t, d), val);
          }
          lse[(b * c.H + h) * c.Tq + t] =
              empty ? std::numeric_limits<float>::infinity() : mrow[i] + std::log(lrow[i]);
        }
      }
}

// P = exp(S·scale - lse) on visible entries, 0 elsewhere (S in, P out)
void probs(const Ctx& c, int64_t b, int64_t m0, int64_t bm, int64_t n0, int64_t bn, const float* lse, float* S) {
  mask_scores(c, b, m0, bm, n0, bn, S);
  for (int64_t i = 0; i < bm; ++i)
    for (int64_t j = 0; j < bn; ++j) {
      float& s = S[i * bn + j];
      s = s == NEG_INF ? 0.f : std::exp(s - lse[i]);
    }
}

template <typename T>
void tva_bwd(const Ctx& c, const TensorView& go, const TensorView& o, const float* lse, const TensorView& dq,
             const TensorView& dk, const TensorView& dv, const TensorView& ddelta, float* rowdot) {
  const int64_t D = c.D, BH = c.B * c.H;
  std::vector<float> Di(BH * c.Tq);
  // Di = Σ_d dO·A with A = o - coef·gate·delta; dDelta = coef·gate·dO; rowdot = Σ_d delta·dO
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t t = 0; t < c.Tq; ++t) {
        const float cg = c.delta.defined() ? c.coef * c.gate_at<T>(b, t, h) : 0.f;
        float di = 0.f, rd = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          const float g = load_f(at4<T>(go, b, h, t, d));
          float a = load_f(at4<T>(o, b, h, t, d));
          if (c.delta.defined()) {
            const float dl = load_f(at4<T>(c.delta, b, h, t, d));
            a -= cg * dl;
            rd += dl * g;
            store_f(at4w<T>(ddelta, b, h, t, d), cg * g);
          }
          di += g * a;
        }
        Di[(b * c.H + h) * c.Tq + t] = di;
        if (c.delta.defined()) rowdot[(b * c.H + h) * c.Tq + t] = rd;
      }
  // dK, dV: one task per key block, looping over the query blocks that can see it
  const int64_t nnb = tva::cdiv(c.Tk, BN);
#pragma omp parallel for collapse(3) schedule(dynamic)
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t nb = 0; nb < nnb; ++nb) {
        const int64_t n0 = nb * BN, bn = std::min(BN, c.Tk - n0);
        std::vector<float> Kt(D * bn), Vt(D * bn), Q(BM * D), G(BM * D), S(BM * bn), dP(BM * bn);
        std::vector<float> dK(bn * D, 0.f), dV(bn * D, 0.f);
        load_rows<T>(c.k, b, h, n0, bn, Kt.data(), true);
        load_rows<T>(c.v, b, h, n0, bn, Vt.data(), true);
        int64_t i_lo, i_hi;
        tva::query_range(c.mask, n0, bn, &i_lo, &i_hi);
        const float* lse_bh = lse + (b * c.H + h) * c.Tq;
        const float* di_bh = Di.data() + (b * c.H + h) * c.Tq;
        for (int64_t m0 = (i_lo / BM) * BM; m0 < i_hi; m0 += BM) {
          const int64_t bm = std::min(BM, c.Tq - m0);
          load_rows<T>(c.q, b, h, m0, bm, Q.data(), false);
          load_rows<T>(go, b, h, m0, bm, G.data(), false);
          mm_nt(Q.data(), Kt.data(), S.data(), bm, bn, D);
          probs(c, b, m0, bm, n0, bn, lse_bh + m0, S.data());
          mm_tn_acc(S.data(), G.data(), dV.data(), bm, bn, D);
          mm_nt(G.data(), Vt.data(), dP.data(), bm, bn, D);
          for (int64_t i = 0; i < bm; ++i)
            for (int64_t j = 0; j < bn; ++j) dP[i * bn + j] = S[i * bn + j] * (dP[i * bn + j] - di_bh[m0 + i]);
          mm_tn_acc(dP.data(), Q.data(), dK.data(), bm, bn, D);
        }
        for (int64_t j = 0; j < bn; ++j)
          for (int64_t d = 0; d < D; ++d) {
            store_f(at4w<T>(dk, b, h, n0 + j, d), dK[j * D + d] * c.scale);
            store_f(at4w<T>(dv, b, h, n0 + j, d), dV[j * D + d]);
          }
      }
  // dQ: one task per query block, looping over the same key blocks as the forward
  const int64_t nmb = tva::cdiv(c.Tq, BM);
#pragma omp parallel for collapse(3) schedule(dynamic)
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t mb = 0; mb < nmb; ++mb) {
        const int64_t m0 = mb * BM, bm = std::min(BM, c.Tq - m0);
        std::vector<float> Q(bm * D), G(bm * D), Kt(D * BN), K(BN * D), Vt(D * BN), S(bm * BN), dP(bm * BN);
        std::vector<float> dQ(bm * D, 0.f);
        load_rows<T>(c.q, b, h, m0, bm, Q.data(), false);
        load_rows<T>(go, b, h, m0, bm, G.data(), false);
        const float* lse_bh = lse + (b * c.H + h) * c.Tq + m0;
        const float* di_bh = Di.data() + (b * c.H + h) * c.Tq + m0;
        auto kb = tva::key_blocks(c.mask, m0, bm, BN);
        for (int64_t it = 0; it < kb.count(); ++it) {
          const int64_t n0 = kb.start(it, BN), bn = std::min(BN, c.Tk - n0);
          load_rows<T>(c.k, b, h, n0, bn, Kt.data(), true);
          load_rows<T>(c.k, b, h, n0, bn, K.data(), false);
          load_rows<T>(c.v, b, h, n0, bn, Vt.data(), true);
          mm_nt(Q.data(), Kt.data(), S.data(), bm, bn, D);
          probs(c, b, m0, bm, n0, bn, lse_bh, S.data());
          mm_nt(G.data(), Vt.data(), dP.data(), bm, bn, D);
          for (int64_t i = 0; i < bm; ++i)
            for (int64_t j = 0; j < bn; ++j) dP[i * bn + j] = S[i * bn + j] * (dP[i * bn + j] - di_bh[i]);
          mm_acc(dP.data(), K.data(), dQ.data(), bm, bn, D);
        }
        for (int64_t i = 0; i < bm; ++i)
          for (int64_t d = 0; d < D; ++d) store_f(at4w<T>(dq, b, h, m0 + i, d), dQ[i * D + d] * c.scale);
      }
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
      "tva_forward_cpu",
      [](py::object q, py::object k, py::object v, py::object delta, py::object gate, double coef, bool causal,
         int64_t window, int64_t sinks, py::object pad, double scale, py::object o_, py::object lse_) {
        Ctx c = make_ctx(q, k, v, delta, gate, coef, causal, window, sinks, pad, scale);
        auto o = TensorView::from(o_, "o"), lse = TensorView::from(lse_, "lse");
        check_out(o, {c.B, c.H, c.Tq, c.D}, c.q.dtype);
        check_out(lse, {c.B, c.H, c.Tq}, DType::Float32);
        check_contiguous3(lse, c);
        py::gil_scoped_release nogil;
        dispatch_float(c.q.dtype, "q", [&](auto tag) {
          using T = decltype(tag);
          if constexpr (!std::is_same_v<T, double>) tva_fwd<T>(c, o, lse.ptr<float>());
        });
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("delta"), py::arg("gate"), py::arg("coef"),
      py::arg("causal"), py::arg("window"), py::arg("sinks"), py::arg("key_padding_mask"), py::arg("scale"),
      py::arg("o"), py::arg("lse"),
      "Fused TVA attention forward: writes o and the row log-sum-exp (+inf for rows with no visible key).");
  m.def(
      "tva_backward_cpu",
      [](py::object grad_o_, py::object q, py::object k, py::object v, py::object o_, py::object lse_,
         py::object delta, py::object gate, double coef, bool causal, int64_t window, int64_t sinks, py::object pad,
         double scale, py::object dq_, py::object dk_, py::object dv_, py::object ddelta_, py::object rowdot_) {
        Ctx c = make_ctx(q, k, v, delta, gate, coef, causal, window, sinks, pad, scale);
        auto go = TensorView::from(grad_o_, "grad_o"), o = TensorView::from(o_, "o");
        auto lse = TensorView::from(lse_, "lse");
        auto dq = TensorView::from(dq_, "dq"), dk = TensorView::from(dk_, "dk"), dv = TensorView::from(dv_, "dv");
        auto ddelta = TensorView::from_optional(ddelta_, "ddelta");
        auto rowdot = TensorView::from_optional(rowdot_, "rowdot");
        check_out(go, {c.B, c.H, c.Tq, c.D}, c.q.dtype);
        check_out(o, {c.B, c.H, c.Tq, c.D}, c.q.dtype);
        check_out(lse, {c.B, c.H, c.Tq}, DType::Float32);
        check_contiguous3(lse, c);
        check_out(dq, {c.B, c.H, c.Tq, c.D}, c.q.dtype);
        check_out(dk, {c.B, c.H, c.Tk, c.D}, c.q.dtype);
        check_out(dv, {c.B, c.H, c.Tk, c.D}, c.q.dtype);
        if (c.delta.defined()) {
          APT_CHECK(ddelta.defined() && rowdot.defined(), "ddelta: required (with rowdot) when delta is given");
          check_out(ddelta, {c.B, c.H, c.Tq, c.D}, c.q.dtype);
          check_out(rowdot, {c.B, c.H, c.Tq}, DType::Float32);
          check_contiguous3(rowdot, c);
        }
        py::gil_scoped_release nogil;
        dispatch_float(c.q.dtype, "q", [&](auto tag) {
          using T = decltype(tag);
          if constexpr (!std::is_same_v<T, double>)
            tva_bwd<T>(c, go, o, lse.ptr<float>(), dq, dk, dv, ddelta,
                       c.delta.defined() ? rowdot.ptr<float>() : nullptr);
        });
      },
      py::arg("grad_o"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("delta"),
      py::arg("gate"), py::arg("coef"), py::arg("causal"), py::arg("window"), py::arg("sinks"),
      py::arg("key_padding_mask"), py::arg("scale"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
      py::arg("ddelta"), py::arg("rowdot"),
      "Fused TVA attention backward from the saved LSE: dq, dk, dv, ddelta = coef·gate·dO, rowdot = Σ_d delta·dO.");
#ifdef APT_WITH_CUDA
  m.def(
      "tva_forward_cuda",
      [](py::object q, py::object k, py::object v, py::object delta, py::object gate, py::object coef_, bool causal,
         int64_t window, int64_t sinks, py::object pad, double scale, py::object o_, py::object lse_,
         uintptr_t stream) {
        Ctx c = make_ctx(q, k, v, delta, gate, 0.0, causal, window, sinks, pad, scale, true);
        auto coef = TensorView::from(coef_, "coef");
        auto o = TensorView::from(o_, "o"), lse = TensorView::from(lse_, "lse");
        check_out(o, {c.B, c.H, c.Tq, c.D}, c.q.dtype, true, c.q.device);
        check_out(lse, {c.B, c.H, c.Tq}, DType::Float32, true, c.q.device);
        check_contiguous3(lse, c);
        tva::CudaParams p = cuda_params(c, coef);
        p.o = o.data;
        copy4(p.so, o);
        p.lse = lse.ptr<float>();
        py::gil_scoped_release nogil;
        tva::tva_forward_cuda(p, stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("delta"), py::arg("gate"), py::arg("coef"),
      py::arg("causal"), py::arg("window"), py::arg("sinks"), py::arg("key_padding_mask"), py::arg("scale"),
      py::arg("o"), py::arg("lse"), py::arg("stream"),
      "Fused TVA attention forward on CUDA (coef: 0-dim fp32 device tensor), on the given stream.");
  m.def(
      "tva_backward_cuda",
      [](py::object grad_o_, py::object q, py::object k, py::object v, py::object o_, py::object lse_,
         py::object delta, py::object gate, py::object coef_, bool causal, int64_t window, int64_t sinks,
         py::object pad, double scale, py::object dq_, py::object dk_, py::object dv_, py::object ddelta_,
         py::object rowdot_, uintptr_t stream) {
        Ctx c = make_ctx(q, k, v, delta, gate, 0.0, causal, window, sinks, pad, scale, true);
        auto coef = TensorView::from(coef_, "coef");
        auto go = TensorView::from(grad_o_, "grad_o"), o = TensorView::from(o_, "o");
        auto lse = TensorView::from(lse_, "lse");
        auto dq = TensorView::from(dq_, "dq"), dk = TensorView::from(dk_, "dk"), dv = TensorView::from(dv_, "dv");
        auto ddelta = TensorView::from_optional(ddelta_, "ddelta");
        auto rowdot = TensorView::from_optional(rowdot_, "rowdot");
        const int dev = c.q.device;
        check_out(go, {c.B, c.H, c.Tq, c.D}, c.q.dtype, true, dev);
        check_out(o, {c.B, c.H, c.Tq, c.D}, c.q.dtype, true, dev);
        check_out(lse, {c.B, c.H, c.Tq}, DType::Float32, true, dev);
        check_contiguous3(lse, c);
        check_out(dq, {c.B, c.H, c.Tq, c.D}, c.q.dtype, true, dev);
        check_out(dk, {c.B, c.H, c.Tk, c.D}, c.q.dtype, true, dev);
        check_out(dv, {c.B, c.H, c.Tk, c.D}, c.q.dtype, true, dev);
        tva::CudaParams p = cuda_params(c, coef);
        if (c.delta.defined()) {
          APT_CHECK(ddelta.defined() && rowdot.defined(), "ddelta: required (with rowdot) when delta is given");
          check_out(ddelta, {c.B, c.H, c.Tq, c.D}, c.q.dtype, true, dev);
          check_out(rowdot, {c.B, c.H, c.Tq}, DType::Float32, true, dev);
          check_contiguous3(rowdot, c);
          p.ddelta = ddelta.data;
          copy4(p.sdd, ddelta);
          p.rowdot = rowdot.ptr<float>();
        }
        p.o = o.data;
        copy4(p.so, o);
        p.lse = lse.ptr<float>();
        p.go = go.data;
        copy4(p.sgo, go);
        p.dq = dq.data; p.dk = dk.data; p.dv = dv.data;
        copy4(p.sdq, dq); copy4(p.sdk, dk); copy4(p.sdv, dv);
        py::gil_scoped_release nogil;
        tva::tva_backward_cuda(p, stream);
      },
      py::arg("grad_o"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("delta"),
      py::arg("gate"), py::arg("coef"), py::arg("causal"), py::arg("window"), py::arg("sinks"),
      py::arg("key_padding_mask"), py::arg("scale"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
      py::arg("ddelta"), py::arg("rowdot"), py::arg("stream"),
      "Fused TVA attention backward on CUDA from the saved LSE (see tva_backward_cpu).");
#endif
}

}  // namespace apt
