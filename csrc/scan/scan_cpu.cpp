// Mamba selective scan on the CPU (SCAN.md): forward (saving the state every `chunk` steps), backward (all grads,
// recomputing states chunk by chunk; O(batch*dim*L/chunk*N) saved memory) and the decode step. OpenMP over
// batch x dim. u/delta/z/out and their grads: fp32/fp16/bf16/fp64, any strides; A, B, C, D, delta_bias arrive packed
// by Python in the accumulation dtype (fp32, fp64 for fp64 u): A (dim, N); B/C (dim, N) or (batch, G, L, N).
// Kernels are built three times (generic x86-64, AVX2+FMA, AVX-512) and the widest the CPU runs is picked at run time.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/apt_common.h"
#include "common/apt_cpu_simd.h"


namespace apt {
namespace scan_cpu {
namespace {

struct S3 {  // strides of a (batch, dim, L) tensor
  int64_t s0 = 0, s1 = 0, s2 = 0;
  int64_t at(int64_t b, int64_t d, int64_t t) const { return b * s0 + d * s1 + t * s2; }
};

template <typename Acc> struct Packed {
  int64_t batch, dim, L, N;
  const Acc* A;           // (dim, N)
  const Acc* B; int64_t gB;  // gB == 0: (dim, N); else (batch, gB, L, N)
  const Acc* C; int64_t gC;
  const Acc* D;           // (dim,) or null
  const Acc* bias;        // (dim,) or null
};

template <typename T> struct IO {
  const T* u; S3 su;
  const T* delta; S3 sdelta;
  const T* z; S3 sz;      // null when no z
  T* out; S3 sout;        // forward
  const T* dout; S3 sdout;  // backward
};

template <typename T> struct Grads {
  const acc_t<T>* dlast;  // (batch, dim, N) or null
  T* du; S3 sdu;
  T* ddelta; S3 sddelta;
  T* dz; S3 sdz;
  acc_t<T>* dA; acc_t<T>* dB; acc_t<T>* dC; acc_t<T>* dD; acc_t<T>* dbias;
};

template <typename T, typename S> struct StepIO {
  S* state; int64_t sstate[3];
  const T* x; int64_t sx[2];
  const T* dt; int64_t sdt[2];
  const T* z; int64_t sz[2];
  T* y; int64_t sy[2];
};

namespace generic {
constexpr int kVecLanes = 8;
#include "scan/scan_cpu_impl.h"
}  // namespace generic

#ifdef APT_CPU_ISA_BUILDS
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int kVecLanes = 8;
#include "scan/scan_cpu_impl.h"
}  // namespace avx2
#pragma GCC pop_options
// AVX-512: N = 16 fp32 states in one register (half the instructions of AVX2 per step), and 32 registers.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
namespace avx512 {
constexpr int kVecLanes = 16;
#include "scan/scan_cpu_impl.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

// The widest build this CPU runs; APT_SCAN_CPU_ISA=generic|avx2 caps it (read on every call, for the tests).
using Isa = CpuIsa;
Isa best_isa() { return best_cpu_isa("APT_SCAN_CPU_ISA"); }

// ---------------------------------------------------------------- argument checks and unpacking
bool is_contiguous(const TensorView& t) {
  int64_t expect = 1;
  for (int64_t i = t.ndim() - 1; i >= 0; --i) {
    if (t.shape[i] != 1 && t.strides[i] != expect) return false;
    expect *= t.shape[i];
  }
  return true;
}

void check_packed(const TensorView& t, DType acc, const std::vector<int64_t>& shape) {
  check_shape(t, shape);
  check_dtype(t, acc);
  check_cpu(t);
  APT_CHECK(is_contiguous(t), t.name, ": expected a contiguous tensor");
}

S3 strides3(const TensorView& t) { return S3{t.stride(0), t.stride(1), t.stride(2)}; }

void check_like(const TensorView& t, const TensorView& ref) {
  check_shape(t, ref.shape);
  check_dtype(t, ref.dtype);
  check_cpu(t);
}

// Checks u/delta/A/B/C/D/bias and returns the packed view of them.
template <typename Acc>
Packed<Acc> make_packed(const TensorView& u, const TensorView& delta, const TensorView& A, const TensorView& B,
                        const TensorView& C, const TensorView& D, const TensorView& bias) {
  check_ndim(u, 3);
  check_float(u);
  check_cpu(u);
  check_like(delta, u);
  const DType acc = u.dtype == DType::Float64 ? DType::Float64 : DType::Float32;
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  check_ndim(A, 2);
  const int64_t N = A.size(1);
  check_packed(A, acc, {dim, N});
  Packed<Acc> p{batch, dim, L, N, A.ptr<Acc>(), nullptr, 0, nullptr, 0, nullptr, nullptr};
  for (const TensorView* m : {&B, &C}) {
    int64_t G = 0;
    if (m->ndim() == 2) {
      check_packed(*m, acc, {dim, N});
    } else {
      APT_CHECK(m->ndim() == 4, m->name, ": expected (dim, N) or packed (batch, G, L, N), got ", m->ndim(), " dims");
      G = m->size(1);
      APT_CHECK(G >= 1 && dim % G == 0, m->name, ": number of groups ", G, " must divide dim=", dim);
      check_packed(*m, acc, {batch, G, L, N});
    }
    if (m == &B) { p.B = m->ptr<Acc>(); p.gB = G; } else { p.C = m->ptr<Acc>(); p.gC = G; }
  }
  if (D.defined()) { check_packed(D, acc, {dim}); p.D = D.ptr<Acc>(); }
  if (bias.defined()) { check_packed(bias, acc, {dim}); p.bias = bias.ptr<Acc>(); }
  return p;
}

using Obj = py::object;

void selective_scan_fwd(Obj u_, Obj delta_, Obj A_, Obj B_, Obj C_, Obj D_, Obj z_, Obj bias_, Obj out_, Obj last_,
                        Obj ckpt_, bool softplus_dt, int64_t chunk) {
  auto u = TensorView::from(u_, "u"), delta = TensorView::from(delta_, "delta"), A = TensorView::from(A_, "A"),
       B = TensorView::from(B_, "B"), C = TensorView::from(C_, "C"), out = TensorView::from(out_, "out"),
       last = TensorView::from(last_, "last_state"), ckpt = TensorView::from(ckpt_, "checkpoints");
  auto D = TensorView::from_optional(D_, "D"), z = TensorView::from_optional(z_, "z"),
       bias = TensorView::from_optional(bias_, "delta_bias");
  APT_CHECK(chunk >= 1, "chunk: expected >= 1, got ", chunk);
  check_ndim(u, 3);
  check_float(u);
  check_like(out, u);
  check_no_overlap(out, "is an output");
  if (z.defined()) check_like(z, u);
  const int64_t nchunks = (u.size(2) + chunk - 1) / chunk;
  dispatch_float(u.dtype, "u", [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    Packed<Acc> p = make_packed<Acc>(u, delta, A, B, C, D, bias);
    const DType acc = u.dtype == DType::Float64 ? DType::Float64 : DType::Float32;
    check_packed(last, acc, {p.batch, p.dim, p.N});
    check_packed(ckpt, acc, {p.batch, p.dim, nchunks, p.N});
    IO<T> io{u.ptr<T>(), strides3(u), delta.ptr<T>(), strides3(delta),
             z.defined() ? z.ptr<T>() : nullptr, z.defined() ? strides3(z) : S3{},
             out.ptr<T>(), strides3(out), nullptr, S3{}};
    const int nth = omp_threads();
    std::vector<Acc> scratch(static_cast<size_t>(nth) * generic::fwd_scratch_per_thread(p.N, chunk));
    py::gil_scoped_release nogil;
    switch (best_isa()) {
#ifdef APT_CPU_ISA_BUILDS
      case Isa::avx512:
        avx512::scan_fwd<T>(io, p, last.ptr<Acc>(), ckpt.ptr<Acc>(), chunk, softplus_dt, scratch.data());
        break;
      case Isa::avx2:
        avx2::scan_fwd<T>(io, p, last.ptr<Acc>(), ckpt.ptr<Acc>(), chunk, softplus_dt, scratch.data());
        break;
#endif
      default: generic::scan_fwd<T>(io, p, last.ptr<Acc>(), ckpt.ptr<Acc>(), chunk, softplus_dt, scratch.data());
    }
  });
}

void selective_scan_bwd(Obj u_, Obj delta_, Obj A_, Obj B_, Obj C_, Obj D_, Obj z_, Obj bias_, Obj dout_,
                        Obj dlast_, Obj ckpt_, Obj du_, Obj ddelta_, Obj dA_, Obj dB_, Obj dC_, Obj dD_, Obj dz_,
                        Obj dbias_, bool softplus_dt, int64_t chunk) {
  auto u = TensorView::from(u_, "u"), delta = TensorView::from(delta_, "delta"), A = TensorView::from(A_, "A"),
       B = TensorView::from(B_, "B"), C = TensorView::from(C_, "C"), dout = TensorView::from(dout_, "dout"),
       ckpt = TensorView::from(ckpt_, "checkpoints"), du = TensorView::from(du_, "du"),
       ddelta = TensorView::from(ddelta_, "ddelta"), dA = TensorView::from(dA_, "dA"), dB = TensorView::from(dB_, "dB"),
       dC = TensorView::from(dC_, "dC");
  auto D = TensorView::from_optional(D_, "D"), z = TensorView::from_optional(z_, "z"),
       bias = TensorView::from_optional(bias_, "delta_bias"), dlast = TensorView::from_optional(dlast_, "dlast_state"),
       dD = TensorView::from_optional(dD_, "dD"), dz = TensorView::from_optional(dz_, "dz"),
       dbias = TensorView::from_optional(dbias_, "ddelta_bias");
  APT_CHECK(chunk >= 1, "chunk: expected >= 1, got ", chunk);
  check_ndim(u, 3);
  check_float(u);
  for (const TensorView* t : {&dout, &du, &ddelta}) check_like(*t, u);
  if (z.defined()) check_like(z, u);
  APT_CHECK(z.defined() == dz.defined(), "dz: must be given exactly when z is");
  APT_CHECK(D.defined() == dD.defined(), "dD: must be given exactly when D is");
  APT_CHECK(bias.defined() == dbias.defined(), "ddelta_bias: must be given exactly when delta_bias is");
  if (dz.defined()) check_like(dz, u);
  for (const TensorView* t : {&du, &ddelta, &dz})
    if (t->defined()) check_no_overlap(*t, "is an output");
  const int64_t nchunks = (u.size(2) + chunk - 1) / chunk;
  dispatch_float(u.dtype, "u", [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    Packed<Acc> p = make_packed<Acc>(u, delta, A, B, C, D, bias);
    const DType acc = u.dtype == DType::Float64 ? DType::Float64 : DType::Float32;
    check_packed(ckpt, acc, {p.batch, p.dim, nchunks, p.N});
    if (dlast.defined()) check_packed(dlast, acc, {p.batch, p.dim, p.N});
    check_packed(dA, acc, A.shape);
    check_packed(dB, acc, B.shape);
    check_packed(dC, acc, C.shape);
    if (dD.defined()) check_packed(dD, acc, {p.dim});
    if (dbias.defined()) check_packed(dbias, acc, {p.dim});
    IO<T> io{u.ptr<T>(), strides3(u), delta.ptr<T>(), strides3(delta),
             z.defined() ? z.ptr<T>() : nullptr, z.defined() ? strides3(z) : S3{},
             nullptr, S3{}, dout.ptr<T>(), strides3(dout)};
    Grads<T> gr{dlast.defined() ? dlast.ptr<Acc>() : nullptr, du.ptr<T>(), strides3(du), ddelta.ptr<T>(),
                strides3(ddelta), dz.defined() ? dz.ptr<T>() : nullptr, dz.defined() ? strides3(dz) : S3{},
                dA.ptr<Acc>(), dB.ptr<Acc>(), dC.ptr<Acc>(), dD.defined() ? dD.ptr<Acc>() : nullptr,
                dbias.defined() ? dbias.ptr<Acc>() : nullptr};
    const int nth = omp_threads();
    const int64_t total = dA.numel() + dB.numel() + dC.numel() + (D.defined() ? p.dim : 0) +
                          (bias.defined() ? p.dim : 0);
    std::vector<Acc> priv(static_cast<size_t>(nth) * total, Acc(0));
    std::vector<Acc> scratch(static_cast<size_t>(nth) * generic::bwd_scratch_per_thread(p.N, chunk));
    py::gil_scoped_release nogil;
    switch (best_isa()) {
#ifdef APT_CPU_ISA_BUILDS
      case Isa::avx512:
        avx512::scan_bwd<T>(io, p, gr, ckpt.ptr<Acc>(), chunk, softplus_dt, priv.data(), scratch.data(), nth);
        break;
      case Isa::avx2:
        avx2::scan_bwd<T>(io, p, gr, ckpt.ptr<Acc>(), chunk, softplus_dt, priv.data(), scratch.data(), nth);
        break;
#endif
      default: generic::scan_bwd<T>(io, p, gr, ckpt.ptr<Acc>(), chunk, softplus_dt, priv.data(), scratch.data(), nth);
    }
  });
}

// state (batch, dim, N) any float dtype and strides, updated in place; x/dt/z/y (batch, dim) one dtype; A (dim, N),
// B/C packed (batch, G, 1, N), D, dt_bias packed in the accumulation dtype of x.
void selective_state_update(Obj state_, Obj x_, Obj dt_, Obj A_, Obj B_, Obj C_, Obj D_, Obj z_, Obj bias_, Obj y_,
                            bool softplus_dt) {
  auto state = TensorView::from(state_, "state"), x = TensorView::from(x_, "x"), dt = TensorView::from(dt_, "dt"),
       A = TensorView::from(A_, "A"), B = TensorView::from(B_, "B"), C = TensorView::from(C_, "C"),
       y = TensorView::from(y_, "y");
  auto D = TensorView::from_optional(D_, "D"), z = TensorView::from_optional(z_, "z"),
       bias = TensorView::from_optional(bias_, "dt_bias");
  check_ndim(state, 3);
  check_float(state);
  check_cpu(state);
  check_no_overlap(state);
  check_ndim(x, 2);
  check_float(x);
  check_cpu(x);
  APT_CHECK(x.size(0) == state.size(0) && x.size(1) == state.size(1), "x: expected shape (", state.size(0), ", ",
            state.size(1), "), got (", x.size(0), ", ", x.size(1), ")");
  check_like(dt, x);
  check_like(y, x);
  check_no_overlap(y, "is an output");
  if (z.defined()) check_like(z, x);
  const int64_t batch = state.size(0), dim = state.size(1), N = state.size(2);
  dispatch_float(x.dtype, "x", [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    const DType acc = x.dtype == DType::Float64 ? DType::Float64 : DType::Float32;
    check_packed(A, acc, {dim, N});
    Packed<Acc> p{batch, dim, 1, N, A.ptr<Acc>(), nullptr, 0, nullptr, 0, nullptr, nullptr};
    for (const TensorView* m : {&B, &C}) {
      check_ndim(*m, 4);
      const int64_t G = m->size(1);
      APT_CHECK(G >= 1 && dim % G == 0, m->name, ": number of groups ", G, " must divide dim=", dim);
      check_packed(*m, acc, {batch, G, 1, N});
      if (m == &B) { p.B = m->ptr<Acc>(); p.gB = G; } else { p.C = m->ptr<Acc>(); p.gC = G; }
    }
    if (D.defined()) { check_packed(D, acc, {dim}); p.D = D.ptr<Acc>(); }
    if (bias.defined()) { check_packed(bias, acc, {dim}); p.bias = bias.ptr<Acc>(); }
    dispatch_float(state.dtype, "state", [&](auto stag) {
      using S = decltype(stag);
      StepIO<T, S> io{state.ptr<S>(), {state.stride(0), state.stride(1), state.stride(2)},
                      x.ptr<T>(), {x.stride(0), x.stride(1)}, dt.ptr<T>(), {dt.stride(0), dt.stride(1)},
                      z.defined() ? z.ptr<T>() : nullptr, {z.defined() ? z.stride(0) : 0, z.defined() ? z.stride(1) : 0},
                      y.ptr<T>(), {y.stride(0), y.stride(1)}};
      py::gil_scoped_release nogil;
      switch (best_isa()) {
#ifdef APT_CPU_ISA_BUILDS
        case Isa::avx512: avx512::state_update<T, S>(io, p, softplus_dt); break;
        case Isa::avx2: avx2::state_update<T, S>(io, p, softplus_dt); break;
#endif
        default: generic::state_update<T, S>(io, p, softplus_dt);
      }
    });
  });
}

}  // namespace
}  // namespace scan_cpu

APT_REGISTER_OPS(scan_cpu) {
  using namespace scan_cpu;
  m.def(
      "scan_cpu_isa", [] { return std::string(cpu_isa_name(best_isa())); },
      "The instruction-set build the scan CPU kernels run now: generic, avx2 or avx512 (APT_SCAN_CPU_ISA caps it).");
  m.def("selective_scan_fwd_cpu", &selective_scan_fwd, py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"),
        py::arg("C"), py::arg("D"), py::arg("z"), py::arg("delta_bias"), py::arg("out"), py::arg("last_state"),
        py::arg("checkpoints"), py::arg("delta_softplus"), py::arg("chunk"),
        "Selective scan forward; writes out, last_state and the state every `chunk` steps (checkpoints).");
  m.def("selective_scan_bwd_cpu", &selective_scan_bwd, py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"),
        py::arg("C"), py::arg("D"), py::arg("z"), py::arg("delta_bias"), py::arg("dout"), py::arg("dlast_state"),
        py::arg("checkpoints"), py::arg("du"), py::arg("ddelta"), py::arg("dA"), py::arg("dB"), py::arg("dC"),
        py::arg("dD"), py::arg("dz"), py::arg("ddelta_bias"), py::arg("delta_softplus"), py::arg("chunk"),
        "Selective scan backward from the forward's checkpoints.");
  m.def("selective_state_update_cpu", &selective_state_update, py::arg("state"), py::arg("x"), py::arg("dt"),
        py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"), py::arg("dt_bias"), py::arg("y"),
        py::arg("dt_softplus"), "One decode step of the selective scan, in place on state.");
}

}  // namespace apt
