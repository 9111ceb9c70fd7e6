// Python bindings of the selective-scan CUDA launchers (scan_cuda.h): check every argument (shape, dtype, device,
// layout; ValueError/TypeError naming it), then launch on the stream passed from Python. Family "scan_cuda";
// compiled only into CUDA builds.
#ifdef APT_WITH_CUDA
#include "common/apt_common.h"
#include "moe/moe_checks.h"  // check_contiguous, check_device (shared argument checks)
#include "scan/scan_cuda.h"

namespace apt {
namespace {

using moe::check_contiguous;
using moe::check_device;
using Obj = py::object;

void check_io_dtype(const TensorView& t) {
  APT_CHECK_TYPE(t.dtype == DType::Float32 || t.dtype == DType::Float16 || t.dtype == DType::BFloat16, t.name,
                 ": the CUDA scan takes float32, float16 or bfloat16, got ", dtype_name(t.dtype));
}
void check_like(const TensorView& t, const TensorView& ref) {
  check_shape(t, ref.shape);
  check_dtype(t, ref.dtype);
  check_device(t, ref.device);
}
void check_f32(const TensorView& t, const std::vector<int64_t>& shape, int device) {
  check_shape(t, shape);
  check_dtype(t, DType::Float32);
  check_device(t, device);
  check_contiguous(t);
}
void copy3(const TensorView& t, int64_t* s) {
  for (int i = 0; i < 3; ++i) s[i] = t.stride(i);
}

// B or C: constant (dim, N) when allow_const, else packed (batch, G, steps, N) with G dividing dim. Returns G
// (0 for the constant layout).
int64_t check_bc(const TensorView& m, int64_t batch, int64_t dim, int64_t steps, int64_t N, int dev,
                 bool allow_const) {
  if (allow_const && m.ndim() == 2) {
    check_f32(m, {dim, N}, dev);
    return 0;
  }
  APT_CHECK(m.ndim() == 4, m.name, ": expected ", allow_const ? "(dim, N) or " : "", "packed (batch, G, ", steps,
            ", N), got ", m.ndim(), " dims");
  const int64_t G = m.size(1);
  APT_CHECK(G >= 1 && dim % G == 0, m.name, ": number of groups ", G, " must divide dim=", dim);
  check_f32(m, {batch, G, steps, N}, dev);
  return G;
}

// u, delta, z (optional), A, B, C, D, bias: checked and filled into p; returns u's view.
TensorView unpack_inputs(scan_cuda::ScanParams& p, Obj u_, Obj delta_, Obj A_, Obj B_, Obj C_, Obj D_, Obj z_,
                         Obj bias_, bool softplus, int64_t chunk) {
  auto u = TensorView::from(u_, "u"), delta = TensorView::from(delta_, "delta"), A = TensorView::from(A_, "A"),
       B = TensorView::from(B_, "B"), C = TensorView::from(C_, "C");
  auto D = TensorView::from_optional(D_, "D"), z = TensorView::from_optional(z_, "z"),
       bias = TensorView::from_optional(bias_, "delta_bias");
  check_ndim(u, 3);
  check_io_dtype(u);
  check_cuda(u);
  check_like(delta, u);
  if (z.defined()) check_like(z, u);
  APT_CHECK(chunk >= 1 && chunk <= scan_cuda::kMaxChunk, "chunk: the CUDA scan takes 1 <= chunk <= ",
            scan_cuda::kMaxChunk, ", got ", chunk);
  const int dev = u.device;
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  APT_CHECK(L >= 1, "u: the CUDA scan needs L >= 1");
  check_ndim(A, 2);
  const int64_t N = A.size(1);
  APT_CHECK(N >= 1 && N <= scan_cuda::kMaxN, "A: the CUDA scan takes 1 <= N <= ", scan_cuda::kMaxN, ", got N=", N);
  check_f32(A, {dim, N}, dev);
  p.dtype = static_cast<int>(u.dtype);
  p.device = dev;
  p.batch = batch;
  p.dim = dim;
  p.L = L;
  p.N = N;
  p.chunk = chunk;
  p.softplus = softplus;
  p.u = u.data;
  p.delta = delta.data;
  copy3(u, p.su);
  copy3(delta, p.sdelta);
  if (z.defined()) {
    p.z = z.data;
    copy3(z, p.sz);
  }
  p.A = A.ptr<float>();
  p.gB = check_bc(B, batch, dim, L, N, dev, true);
  p.gC = check_bc(C, batch, dim, L, N, dev, true);
  p.B = B.ptr<float>();
  p.C = C.ptr<float>();
  if (D.defined()) { check_f32(D, {dim}, dev); p.D = D.ptr<float>(); }
  if (bias.defined()) { check_f32(bias, {dim}, dev); p.bias = bias.ptr<float>(); }
  return u;
}

// The time split (scan_cuda.h): chunks_per_split, and the workspace seg_state (rows, splits-1, N) and
// seg_dt (rows, splits-1) when it makes several splits.
void unpack_splits(scan_cuda::ScanParams& p, Obj seg_state_, Obj seg_dt_, int64_t chunks_per_split) {
  auto seg_state = TensorView::from_optional(seg_state_, "seg_state"),
       seg_dt = TensorView::from_optional(seg_dt_, "seg_dt");
  const int64_t nchunks = (p.L + p.chunk - 1) / p.chunk;
  APT_CHECK(chunks_per_split >= 1, "chunks_per_split: expected >= 1, got ", chunks_per_split);
  const int64_t nsplits = (nchunks + chunks_per_split - 1) / chunks_per_split;
  APT_CHECK(nsplits <= 65535, "chunks_per_split: ", nsplits, " splits, at most 65535");
  if (nsplits > 1) {
    APT_CHECK(seg_state.defined() && seg_dt.defined(), "seg_state, seg_dt: needed with ", nsplits, " splits");
    check_f32(seg_state, {p.batch * p.dim, nsplits - 1, p.N}, p.device);
    check_f32(seg_dt, {p.batch * p.dim, nsplits - 1}, p.device);
    p.seg_state = seg_state.ptr<float>();
    p.seg_dt = seg_dt.ptr<float>();
  }
  p.chunks_per_split = chunks_per_split;
}

void selective_scan_fwd(Obj u_, Obj delta_, Obj A_, Obj B_, Obj C_, Obj D_, Obj z_, Obj bias_, Obj out_, Obj last_,
                        Obj ckpt_, Obj seg_state_, Obj seg_dt_, bool softplus, int64_t chunk,
                        int64_t chunks_per_split, uintptr_t stream) {
  scan_cuda::ScanParams p;
  const TensorView u = unpack_inputs(p, u_, delta_, A_, B_, C_, D_, z_, bias_, softplus, chunk);
  auto out = TensorView::from(out_, "out"), last = TensorView::from(last_, "last_state"),
       ckpt = TensorView::from(ckpt_, "checkpoints");
  check_like(out, u);
  check_no_overlap(out, "is an output");
  const int64_t nchunks = (p.L + chunk - 1) / chunk;
  check_f32(last, {p.batch, p.dim, p.N}, p.device);
  check_f32(ckpt, {p.batch, p.dim, nchunks, p.N}, p.device);
  unpack_splits(p, seg_state_, seg_dt_, chunks_per_split);
  p.out = out.data;
  copy3(out, p.sout);
  p.last = last.ptr<float>();
  p.ckpt = ckpt.ptr<float>();
  py::gil_scoped_release nogil;
  scan_cuda::selective_scan_fwd(p, stream);
}

void selective_scan_bwd(Obj u_, Obj delta_, Obj A_, Obj B_, Obj C_, Obj D_, Obj z_, Obj bias_, Obj dout_,
                        Obj dlast_, Obj ckpt_, Obj du_, Obj ddelta_, Obj dA_, Obj dB_, Obj dC_, Obj dD_, Obj dz_,
                        Obj dbias_, Obj seg_state_, Obj seg_dt_, bool softplus, int64_t chunk,
                        int64_t chunks_per_split, uintptr_t stream) {
  scan_cuda::ScanParams p;
  const TensorView u = unpack_inputs(p, u_, delta_, A_, B_, C_, D_, z_, bias_, softplus, chunk);
  auto dout = TensorView::from(dout_, "dout"), ckpt = TensorView::from(ckpt_, "checkpoints"),
       du = TensorView::from(du_, "du"), ddelta = TensorView::from(ddelta_, "ddelta"),
       dA = TensorView::from(dA_, "dA"), dB = TensorView::from(dB_, "dB"), dC = TensorView::from(dC_, "dC");
  auto dlast = TensorView::from_optional(dlast_, "dlast_state"), dD = TensorView::from_optional(dD_, "dD"),
       dz = TensorView::from_optional(dz_, "dz"), dbias = TensorView::from_optional(dbias_, "ddelta_bias");
  for (const TensorView* t : {&dout, &du, &ddelta}) check_like(*t, u);
  for (const TensorView* t : {&du, &ddelta}) check_no_overlap(*t, "is an output");
  // by the arguments, not by p.z/p.D/p.bias: an empty tensor (batch or dim 0) has a null data pointer
  APT_CHECK((!z_.is_none()) == dz.defined(), "dz: must be given exactly when z is");
  APT_CHECK((!D_.is_none()) == dD.defined(), "dD: must be given exactly when D is");
  APT_CHECK((!bias_.is_none()) == dbias.defined(), "ddelta_bias: must be given exactly when delta_bias is");
  const int64_t nchunks = (p.L + chunk - 1) / chunk;
  check_f32(ckpt, {p.batch, p.dim, nchunks, p.N}, p.device);
  if (dlast.defined()) {
    check_f32(dlast, {p.batch, p.dim, p.N}, p.device);
    p.dlast = dlast.ptr<float>();
  }
  check_f32(dA, {p.dim, p.N}, p.device);
  check_f32(dB, p.gB ? std::vector<int64_t>{p.batch, p.gB, p.L, p.N} : std::vector<int64_t>{p.dim, p.N}, p.device);
  check_f32(dC, p.gC ? std::vector<int64_t>{p.batch, p.gC, p.L, p.N} : std::vector<int64_t>{p.dim, p.N}, p.device);
  if (dD.defined()) { check_f32(dD, {p.dim}, p.device); p.dD = dD.ptr<float>(); }
  if (dbias.defined()) { check_f32(dbias, {p.dim}, p.device); p.dbias = dbias.ptr<float>(); }
  if (dz.defined()) {
    check_like(dz, u);
    check_no_overlap(dz, "is an output");
    p.dz = dz.data;
    copy3(dz, p.sdz);
  }
  p.ckpt = ckpt.ptr<float>();
  p.dout = dout.data;
  copy3(dout, p.sdout);
  p.du = du.data;
  copy3(du, p.sdu);
  p.ddelta = ddelta.data;
  copy3(ddelta, p.sddelta);
  p.dA = dA.ptr<float>();
  p.dB = dB.ptr<float>();
  p.dC = dC.ptr<float>();
  unpack_splits(p, seg_state_, seg_dt_, chunks_per_split);
  py::gil_scoped_release nogil;
  scan_cuda::selective_scan_bwd(p, stream);
}

// state (batch, dim, N) fp32/fp16/bf16, any strides, in place; x/dt/z/y (batch, dim) one dtype; A (dim, N),
// B/C packed (batch, G, 1, N), D, dt_bias (dim,): contiguous fp32.
void selective_state_update(Obj state_, Obj x_, Obj dt_, Obj A_, Obj B_, Obj C_, Obj D_, Obj z_, Obj bias_, Obj y_,
                            bool softplus, uintptr_t stream) {
  auto state = TensorView::from(state_, "state"), x = TensorView::from(x_, "x"), dt = TensorView::from(dt_, "dt"),
       A = TensorView::from(A_, "A"), B = TensorView::from(B_, "B"), C = TensorView::from(C_, "C"),
       y = TensorView::from(y_, "y");
  auto D = TensorView::from_optional(D_, "D"), z = TensorView::from_optional(z_, "z"),
       bias = TensorView::from_optional(bias_, "dt_bias");
  check_ndim(state, 3);
  check_io_dtype(state);
  check_cuda(state);
  check_no_overlap(state);
  const int dev = state.device;
  check_ndim(x, 2);
  check_io_dtype(x);
  check_device(x, dev);
  const int64_t batch = state.size(0), dim = state.size(1), N = state.size(2);
  APT_CHECK(N >= 1, "state: expected N >= 1");
  check_shape(x, {batch, dim});
  check_like(dt, x);
  check_like(y, x);
  check_no_overlap(y, "is an output");
  if (z.defined()) check_like(z, x);
  check_f32(A, {dim, N}, dev);
  scan_cuda::StepParams p;
  p.gB = check_bc(B, batch, dim, 1, N, dev, false);
  p.gC = check_bc(C, batch, dim, 1, N, dev, false);
  p.B = B.ptr<float>();
  p.C = C.ptr<float>();
  if (D.defined()) { check_f32(D, {dim}, dev); p.D = D.ptr<float>(); }
  if (bias.defined()) { check_f32(bias, {dim}, dev); p.bias = bias.ptr<float>(); }
  p.dtype = static_cast<int>(x.dtype);
  p.state_dtype = static_cast<int>(state.dtype);
  p.device = dev;
  p.batch = batch;
  p.dim = dim;
  p.N = N;
  p.softplus = softplus;
  p.state = state.data;
  for (int i = 0; i < 3; ++i) p.sstate[i] = state.stride(i);
  p.x = x.data;
  p.dt = dt.data;
  p.y = y.data;
  p.A = A.ptr<float>();
  for (int i = 0; i < 2; ++i) {
    p.sx[i] = x.stride(i);
    p.sdt[i] = dt.stride(i);
    p.sy[i] = y.stride(i);
  }
  if (z.defined()) {
    p.z = z.data;
    for (int i = 0; i < 2; ++i) p.sz[i] = z.stride(i);
  }
  py::gil_scoped_release nogil;
  scan_cuda::selective_state_update(p, stream);
}

}  // namespace

APT_REGISTER_OPS(scan_cuda) {
  m.def("selective_scan_fwd_cuda", &selective_scan_fwd, py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"),
        py::arg("C"), py::arg("D"), py::arg("z"), py::arg("delta_bias"), py::arg("out"), py::arg("last_state"),
        py::arg("checkpoints"), py::arg("seg_state"), py::arg("seg_dt"), py::arg("delta_softplus"),
        py::arg("chunk"), py::arg("chunks_per_split"), py::arg("stream"),
        "Selective scan forward on CUDA; writes out, last_state and the state every `chunk` steps (checkpoints). "
        "Time is cut into splits of `chunks_per_split` chunks run in parallel (seg_state/seg_dt: workspace).");
  m.def("selective_scan_bwd_cuda", &selective_scan_bwd, py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"),
        py::arg("C"), py::arg("D"), py::arg("z"), py::arg("delta_bias"), py::arg("dout"), py::arg("dlast_state"),
        py::arg("checkpoints"), py::arg("du"), py::arg("ddelta"), py::arg("dA"), py::arg("dB"), py::arg("dC"),
        py::arg("dD"), py::arg("dz"), py::arg("ddelta_bias"), py::arg("seg_state"), py::arg("seg_dt"),
        py::arg("delta_softplus"), py::arg("chunk"), py::arg("chunks_per_split"), py::arg("stream"),
        "Selective scan backward on CUDA from the forward's checkpoints (dA/dB/dC/dD/dbias zeroed).");
  m.def("selective_state_update_cuda", &selective_state_update, py::arg("state"), py::arg("x"), py::arg("dt"),
        py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"), py::arg("dt_bias"), py::arg("y"),
        py::arg("dt_softplus"), py::arg("stream"), "One decode step of the selective scan on CUDA, in place on state.");
}

}  // namespace apt
#endif  // APT_WITH_CUDA
