// Causal running mean over time, the TVA gate's input m_t (TVA.md, layer step 3):
//   out[b, t, c] = mean of x[b, s, c] over s <= t with keep[b, s]  (0 when no kept position yet)
// and its backward. x: (B, T, C) any strides, fp32/fp16/bf16/fp64; keep: optional (B, T) bool, True = kept
// (the negation of a key padding mask). Accumulates in double. OpenMP over B x C.
#include "common/apt_common.h"

namespace apt {
namespace {

template <typename T>
void running_mean_fwd(const TensorView& x, const TensorView& keep, const TensorView& out) {
  const int64_t B = x.size(0), T_ = x.size(1), C = x.size(2);
  const T* xp = x.ptr<T>();
  T* op = out.ptr<T>();
  const bool* kp = keep.defined() ? keep.ptr<bool>() : nullptr;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      double sum = 0.0;
      int64_t count = 0;
      for (int64_t t = 0; t < T_; ++t) {
        bool k = kp ? kp[b * keep.stride(0) + t * keep.stride(1)] : true;
        if (k) {
          sum += load_f(xp + b * x.stride(0) + t * x.stride(1) + c * x.stride(2));
          ++count;
        }
        acc_t<T> m = count ? static_cast<acc_t<T>>(sum / static_cast<double>(count)) : acc_t<T>(0);
        store_f(op + b * out.stride(0) + t * out.stride(1) + c * out.stride(2), m);
      }
    }
  }
}

// grad_x[b, s, c] = keep[b, s] * sum_{t >= s, count_t > 0} grad_out[b, t, c] / count_t
template <typename T>
void running_mean_bwd(const TensorView& grad_out, const TensorView& keep, const TensorView& grad_x) {
  const int64_t B = grad_out.size(0), T_ = grad_out.size(1), C = grad_out.size(2);
  const T* gp = grad_out.ptr<T>();
  T* gx = grad_x.ptr<T>();
  const bool* kp = keep.defined() ? keep.ptr<bool>() : nullptr;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> counts(T_);
    int64_t count = 0;
    for (int64_t t = 0; t < T_; ++t) {
      if (!kp || kp[b * keep.stride(0) + t * keep.stride(1)]) ++count;
      counts[t] = count;
    }
    for (int64_t c = 0; c < C; ++c) {
      double acc = 0.0;
      for (int64_t t = T_ - 1; t >= 0; --t) {
        if (counts[t] > 0)
          acc += load_f(gp + b * grad_out.stride(0) + t * grad_out.stride(1) + c * grad_out.stride(2)) /
                 static_cast<double>(counts[t]);
        bool k = !kp || kp[b * keep.stride(0) + t * keep.stride(1)];
        store_f(gx + b * grad_x.stride(0) + t * grad_x.stride(1) + c * grad_x.stride(2),
                k ? static_cast<acc_t<T>>(acc) : acc_t<T>(0));
      }
    }
  }
}

void check_args(const TensorView& x, const TensorView& keep, const TensorView& out) {
  check_ndim(x, 3);
  check_float(x);
  check_cpu(x);
  check_shape(out, x.shape);
  check_dtype(out, x.dtype);
  check_cpu(out);
  if (keep.defined()) {
    check_shape(keep, {x.size(0), x.size(1)});
    check_dtype(keep, DType::Bool);
    check_cpu(keep);
  }
}

}  // namespace

APT_REGISTER_OPS(common) {
  m.def(
      "running_mean_cpu",
      [](py::object x_, py::object keep_, py::object out_) {
        auto x = TensorView::from(x_, "x"), out = TensorView::from(out_, "out");
        auto keep = TensorView::from_optional(keep_, "keep");
        check_args(x, keep, out);
        py::gil_scoped_release nogil;
        dispatch_float(x.dtype, "x", [&](auto tag) { running_mean_fwd<decltype(tag)>(x, keep, out); });
      },
      py::arg("x"), py::arg("keep"), py::arg("out"),
      "out[b,t,c] = mean of x[b,s,c] over kept s <= t (0 when none).");
  m.def(
      "running_mean_backward_cpu",
      [](py::object g_, py::object keep_, py::object gx_) {
        auto g = TensorView::from(g_, "grad_out"), gx = TensorView::from(gx_, "grad_x");
        auto keep = TensorView::from_optional(keep_, "keep");
        check_args(g, keep, gx);
        py::gil_scoped_release nogil;
        dispatch_float(g.dtype, "grad_out", [&](auto tag) { running_mean_bwd<decltype(tag)>(g, keep, gx); });
      },
      py::arg("grad_out"), py::arg("keep"), py::arg("grad_x"));
}

}  // namespace apt
