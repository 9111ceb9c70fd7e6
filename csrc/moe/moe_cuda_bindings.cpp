// Python bindings of the MoE CUDA launchers (moe_cuda.cu): check every argument (shape, dtype, device, layout),
// then launch on the stream passed from Python. Compiled only into CUDA builds.
#ifdef APT_WITH_CUDA
#include "common/apt_common.h"
#include "moe/moe_checks.h"
#include "moe/moe_cuda.h"

namespace apt {
namespace {

using moe::check_contiguous;
using moe::check_device;
using moe::check_index;
using moe::check_capacity;

void check_values(const TensorView& t, int device) {
  check_ndim(t, 2);
  APT_CHECK_TYPE(t.dtype == DType::Float32 || t.dtype == DType::Float16 || t.dtype == DType::BFloat16, t.name,
                 ": the CUDA MoE kernels take float32, float16 or bfloat16, got ", dtype_name(t.dtype));
  check_device(t, device);
  // an empty tensor has no elements to stride over (torch gives e.g. the 0-token gradient of y.sum() strides (0, 0))
  APT_CHECK(t.size(0) == 0 || t.size(1) <= 1 || t.stride(1) == 1, t.name,
            ": expected unit stride along the channel dim");
}

void check_out(const TensorView& t, const std::vector<int64_t>& shape, DType dtype, int device) {
  check_shape(t, shape);
  check_dtype(t, dtype);
  check_device(t, device);
  check_contiguous(t);
}

int cuda_device_of(const TensorView& t) {
  check_cuda(t);
  return t.device;
}

}  // namespace

APT_REGISTER_OPS(moe_cuda) {
  m.def(
      "moe_route_cuda",
      [](py::object probs_, int64_t k, int64_t cap, py::object idx_, py::object pos_, py::object slot_,
         py::object tos_, py::object counts_, py::object work_, uintptr_t stream) {
        auto probs = TensorView::from(probs_, "probs");
        auto idx = TensorView::from(idx_, "expert_idx"), pos = TensorView::from(pos_, "position");
        auto slot = TensorView::from(slot_, "slot"), tos = TensorView::from(tos_, "token_of_slot");
        auto counts = TensorView::from(counts_, "tokens_per_expert"), work = TensorView::from(work_, "work");
        const int dev = cuda_device_of(probs);
        check_ndim(probs, 2);
        check_dtype(probs, DType::Float32);
        const int64_t N = probs.size(0), E = probs.size(1);
        APT_CHECK(E >= 1 && E <= moe_cuda::kMaxExperts, "probs: the CUDA router takes 1 to ", moe_cuda::kMaxExperts,
                  " experts, got ", E);
        APT_CHECK(k >= 1 && k <= E && k <= moe_cuda::kMaxK, "k: expected 1 <= k <= min(num_experts, ",
                  moe_cuda::kMaxK, "), got ", k);
        check_capacity(cap, E);
        check_index(idx, {N, k}, dev);
        check_index(pos, {N, k}, dev);
        check_index(slot, {N, k}, dev);
        const int64_t S = cap < 0 ? N * k : E * cap;
        check_index(tos, {S}, dev);
        check_index(counts, {E}, dev);
        const int64_t nb = (N + moe_cuda::kRouteBlock - 1) / moe_cuda::kRouteBlock;
        check_ndim(work, 1);
        check_index(work, work.shape, dev);
        APT_CHECK(work.size(0) >= k * nb * E + E, "work: expected at least ", k * nb * E + E, " elements, got ",
                  work.size(0));
        py::gil_scoped_release nogil;
        moe_cuda::route(probs.ptr<float>(), N, E, probs.stride(0), probs.stride(1), k, cap, idx.ptr<int64_t>(),
                        pos.ptr<int64_t>(), slot.ptr<int64_t>(), tos.ptr<int64_t>(), S, counts.ptr<int64_t>(),
                        work.ptr<int64_t>(), dev, stream);
      },
      py::arg("probs"), py::arg("k"), py::arg("cap"), py::arg("expert_idx"), py::arg("position"), py::arg("slot"),
      py::arg("token_of_slot"), py::arg("tokens_per_expert"), py::arg("work"), py::arg("stream"));
  m.def(
      "moe_dispatch_cuda",
      [](py::object x_, py::object tos_, py::object buf_, uintptr_t stream) {
        auto x = TensorView::from(x_, "x"), tos = TensorView::from(tos_, "token_of_slot");
        auto buf = TensorView::from(buf_, "buf");
        const int dev = cuda_device_of(x);
        check_values(x, dev);
        check_ndim(tos, 1);
        check_index(tos, tos.shape, dev);
        check_out(buf, {tos.size(0), x.size(1)}, x.dtype, dev);
        py::gil_scoped_release nogil;
        moe_cuda::dispatch(static_cast<int>(x.dtype), x.data, x.size(0), x.size(1), x.stride(0), tos.ptr<int64_t>(),
                           tos.size(0), buf.data, dev, stream);
      },
      py::arg("x"), py::arg("token_of_slot"), py::arg("buf"), py::arg("stream"));
  m.def(
      "moe_dispatch_backward_cuda",
      [](py::object g_, py::object slot_, py::object gx_, uintptr_t stream) {
        auto g = TensorView::from(g_, "grad_buf"), slot = TensorView::from(slot_, "slot");
        auto gx = TensorView::from(gx_, "grad_x");
        const int dev = cuda_device_of(g);
        check_values(g, dev);
        check_ndim(slot, 2);
        check_index(slot, slot.shape, dev);
        check_out(gx, {slot.size(0), g.size(1)}, g.dtype, dev);
        py::gil_scoped_release nogil;
        moe_cuda::dispatch_backward(static_cast<int>(g.dtype), g.data, g.size(0), g.size(1), g.stride(0),
                                    slot.ptr<int64_t>(), slot.size(0), slot.size(1), gx.data, dev, stream);
      },
      py::arg("grad_buf"), py::arg("slot"), py::arg("grad_x"), py::arg("stream"));
  m.def(
      "moe_combine_cuda",
      [](py::object out_, py::object w_, py::object slot_, py::object y_, uintptr_t stream) {
        auto out = TensorView::from(out_, "expert_out"), w = TensorView::from(w_, "weights");
        auto slot = TensorView::from(slot_, "slot"), y = TensorView::from(y_, "y");
        const int dev = cuda_device_of(out);
        check_values(out, dev);
        check_ndim(slot, 2);
        check_index(slot, slot.shape, dev);
        check_out(w, slot.shape, DType::Float32, dev);
        check_out(y, {slot.size(0), out.size(1)}, out.dtype, dev);
        py::gil_scoped_release nogil;
        moe_cuda::combine(static_cast<int>(out.dtype), out.data, out.size(0), out.size(1), out.stride(0),
                          w.ptr<float>(), slot.ptr<int64_t>(), slot.size(0), slot.size(1), y.data, dev, stream);
      },
      py::arg("expert_out"), py::arg("weights"), py::arg("slot"), py::arg("y"), py::arg("stream"));
  m.def(
      "moe_combine_backward_cuda",
      [](py::object gy_, py::object out_, py::object w_, py::object slot_, py::object tos_, py::object go_,
         py::object gw_, uintptr_t stream) {
        auto gy = TensorView::from(gy_, "grad_y"), out = TensorView::from(out_, "expert_out");
        auto w = TensorView::from(w_, "weights"), slot = TensorView::from(slot_, "slot");
        auto tos = TensorView::from(tos_, "token_of_slot"), go = TensorView::from(go_, "grad_expert_out");
        auto gw = TensorView::from(gw_, "grad_weights");
        const int dev = cuda_device_of(out);
        check_values(out, dev);
        check_ndim(slot, 2);
        check_index(slot, slot.shape, dev);
        check_index(tos, {out.size(0)}, dev);
        check_values(gy, dev);
        check_shape(gy, {slot.size(0), out.size(1)});
        check_dtype(gy, out.dtype);
        check_out(w, slot.shape, DType::Float32, dev);
        check_out(go, out.shape, out.dtype, dev);
        check_out(gw, slot.shape, DType::Float32, dev);
        py::gil_scoped_release nogil;
        moe_cuda::combine_backward(static_cast<int>(out.dtype), gy.data, gy.stride(0), out.data, out.stride(0),
                                   out.size(0), out.size(1), w.ptr<float>(), slot.ptr<int64_t>(), tos.ptr<int64_t>(),
                                   slot.size(0), slot.size(1), go.data, gw.ptr<float>(), dev, stream);
      },
      py::arg("grad_y"), py::arg("expert_out"), py::arg("weights"), py::arg("slot"), py::arg("token_of_slot"),
      py::arg("grad_expert_out"), py::arg("grad_weights"), py::arg("stream"));
}

}  // namespace apt
#endif  // APT_WITH_CUDA
