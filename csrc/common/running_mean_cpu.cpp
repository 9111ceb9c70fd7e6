// Causal running mean over time, the TVA gate's input m_t (TVA.md, layer step 3):
//   out[b, t, c] = mean of x[b, s, c] over s <= t with keep[b, s]  (0 when no kept position yet)
// and its backward. x: (B, T, C) any strides, fp32/fp16/bf16/fp64; keep: optional (B, T) bool, True = kept
// (the negation of a key padding mask). Accumulates in double. OpenMP over batch rows (cut into channel chunks when
// there are fewer rows than threads).
#include "common/apt_common.h"
#include "common/apt_cpu_simd.h"

#include <type_traits>
#include <vector>

namespace apt {
namespace {

// Each task is a batch row's channels c0 .. c0 + width, walking time with one double accumulator per channel, so the
// innermost loop runs over contiguous channels (vectorised when their stride is 1) and has no division. Whole rows
// (width C, one contiguous stream per task) when the batch alone gives every thread work; otherwise rows are cut into
// enough chunks of at least kMinChunk channels. (The first version walked time one channel at a time, a strided
// column, with a double division per element, and ran slower than torch's cumsum at every size; fixed 128-channel
// chunks of 4 KB rows then ran 2.6x slower than whole rows, each time step of a task landing on another page.)
constexpr int64_t kMinChunk = 64;
// Below this many elements the kernel runs on the calling thread: waking the OpenMP team costs microseconds, more
// than the whole call at decode (B x 1 x C).
constexpr int64_t kParallelWork = int64_t(1) << 14;

int64_t chunk_width(int64_t B, int64_t C) {
  if (B == 0 || C == 0) return 1;  // no task either way
  const int64_t want = 2 * static_cast<int64_t>(omp_threads());  // tasks, so that uneven ones even out
  const int64_t splits = std::min<int64_t>(B >= want ? 1 : (want + B - 1) / B, (C + kMinChunk - 1) / kMinChunk);
  return ((C + splits - 1) / splits + 15) / 16 * 16;
}

// The channel loops, instantiated for unit channel strides (vectorised) and for any strides.
template <typename T, bool UNIT>
inline void add_row(double* acc, const T* x, int64_t sx, int64_t n, double w) {
  for (int64_t c = 0; c < n; ++c) acc[c] += static_cast<double>(load_f(x + (UNIT ? c : c * sx))) * w;
}
template <typename T, bool UNIT>
inline void store_row(T* out, int64_t so, const double* acc, int64_t n, double w) {
  for (int64_t c = 0; c < n; ++c) store_f(out + (UNIT ? c : c * so), static_cast<acc_t<T>>(acc[c] * w));
}

template <typename T, bool UNIT>
void running_mean_fwd(const TensorView& x, const TensorView& keep, const TensorView& out) {
  const int64_t B = x.size(0), T_ = x.size(1), C = x.size(2), width = chunk_width(B, C);
  const int64_t nch = (C + width - 1) / width;
  const T* xp = x.ptr<T>();
  T* op = out.ptr<T>();
  const bool* kp = keep.defined() ? keep.ptr<bool>() : nullptr;
#pragma omp parallel if (B * T_ * C >= kParallelWork)
  {
    std::vector<double> acc(width);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * nch; ++task) {
      const int64_t b = task / nch, c0 = task % nch * width, n = std::min(width, C - c0);
      std::fill(acc.begin(), acc.end(), 0.0);
      int64_t count = 0;
      for (int64_t t = 0; t < T_; ++t) {
        if (!kp || kp[b * keep.stride(0) + t * keep.stride(1)]) {
          ++count;
          add_row<T, UNIT>(acc.data(), xp + b * x.stride(0) + t * x.stride(1) + c0 * x.stride(2), x.stride(2), n,
                           1.0);
        }
        // before the first kept position acc is 0, and so is the contract's mean
        store_row<T, UNIT>(op + b * out.stride(0) + t * out.stride(1) + c0 * out.stride(2), out.stride(2),
                           acc.data(), n, count ? 1.0 / static_cast<double>(count) : 0.0);
      }
    }
  }
}

// grad_x[b, s, c] = keep[b, s] * sum_{t >= s, count_t > 0} grad_out[b, t, c] / count_t, walking time backwards
template <typename T, bool UNIT>
void running_mean_bwd(const TensorView& grad_out, const TensorView& keep, const TensorView& grad_x) {
  const int64_t B = grad_out.size(0), T_ = grad_out.size(1), C = grad_out.size(2), width = chunk_width(B, C);
  const int64_t nch = (C + width - 1) / width;
  const T* gp = grad_out.ptr<T>();
  T* gx = grad_x.ptr<T>();
  const bool* kp = keep.defined() ? keep.ptr<bool>() : nullptr;
#pragma omp parallel if (B * T_ * C >= kParallelWork)
  {
    std::vector<double> acc(width), inv(T_);  // inv: 1 / count_t, 0 before the first kept position
    std::vector<char> kept(T_);
    int64_t inv_b = -1;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * nch; ++task) {
      const int64_t b = task / nch, c0 = task % nch * width, n = std::min(width, C - c0);
      if (b != inv_b) {
        int64_t count = 0;
        for (int64_t t = 0; t < T_; ++t) {
          kept[t] = !kp || kp[b * keep.stride(0) + t * keep.stride(1)];
          count += kept[t];
          inv[t] = count ? 1.0 / static_cast<double>(count) : 0.0;
        }
        inv_b = b;
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t t = T_ - 1; t >= 0; --t) {
        add_row<T, UNIT>(acc.data(), gp + b * grad_out.stride(0) + t * grad_out.stride(1) + c0 * grad_out.stride(2),
                         grad_out.stride(2), n, inv[t]);
        store_row<T, UNIT>(gx + b * grad_x.stride(0) + t * grad_x.stride(1) + c0 * grad_x.stride(2),
                           grad_x.stride(2), acc.data(), n, kept[t] ? 1.0 : 0.0);
      }
    }
  }
}

// f(std::bool_constant<UNIT>): UNIT when the input's and the output's channels (dim 2) both have stride 1
template <typename F>
void with_channel_stride(const TensorView& in, const TensorView& out, F&& f) {
  if (in.stride(2) == 1 && out.stride(2) == 1)
    f(std::true_type{});
  else
    f(std::false_type{});
}

void check_args(const TensorView& x, const TensorView& keep, const TensorView& out) {
  check_ndim(x, 3);
  check_float(x);
  check_cpu(x);
  check_shape(out, x.shape);
  check_dtype(out, x.dtype);
  check_cpu(out);
  check_no_overlap(out, "is an output");
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
        dispatch_float(x.dtype, "x", [&](auto tag) {
          with_channel_stride(x, out, [&](auto unit) { running_mean_fwd<decltype(tag), unit.value>(x, keep, out); });
        });
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
        dispatch_float(g.dtype, "grad_out", [&](auto tag) {
          with_channel_stride(g, gx, [&](auto unit) { running_mean_bwd<decltype(tag), unit.value>(g, keep, gx); });
        });
      },
      py::arg("grad_out"), py::arg("keep"), py::arg("grad_x"));
}

}  // namespace apt
