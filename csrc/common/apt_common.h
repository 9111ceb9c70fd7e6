// Shared host-side helpers for apt_kernels._C: tensor views built from (pointer, dtype, shape, strides, device)
// tuples passed by Python, argument checks that raise ValueError/TypeError naming the argument, fp16/bf16 scalar
// conversion (we do not link libtorch, so no c10::Half), and the op-registration hook each family uses.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace apt {
namespace py = pybind11;

// Dtype codes shared with apt_kernels/_native.py (DTYPE_CODES); keep the two in sync.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3, Int64 = 4, Int32 = 5, Bool = 6 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float64: return "float64";
    case DType::Int64: return "int64";
    case DType::Int32: return "int32";
    case DType::Bool: return "bool";
  }
  return "unknown";
}

inline size_t dtype_size(DType d) {
  switch (d) {
    case DType::Float32: case DType::Int32: return 4;
    case DType::Float16: case DType::BFloat16: return 2;
    case DType::Float64: case DType::Int64: return 8;
    case DType::Bool: return 1;
  }
  return 0;
}

// Errors: std::invalid_argument -> ValueError; py::type_error -> TypeError (pybind11 translates both).
template <typename... Args>
std::string str_cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
#define APT_CHECK(cond, ...) \
  do { if (!(cond)) throw std::invalid_argument(::apt::str_cat(__VA_ARGS__)); } while (0)
#define APT_CHECK_TYPE(cond, ...) \
  do { if (!(cond)) throw ::pybind11::type_error(::apt::str_cat(__VA_ARGS__)); } while (0)

// A strided view of a tensor owned by Python. `device` is -1 for CPU, else the CUDA device index.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::Float32;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements
  int device = -1;
  std::string name;

  int64_t ndim() const { return static_cast<int64_t>(shape.size()); }
  int64_t size(int64_t i) const { return shape.at(i < 0 ? i + ndim() : i); }
  int64_t stride(int64_t i) const { return strides.at(i < 0 ? i + ndim() : i); }
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  template <typename T> T* ptr() const { return static_cast<T*>(data); }

  // Parse the tuple made by apt_kernels._native.view(); `name` is used in error messages.
  static TensorView from(py::handle obj, const std::string& name) {
    APT_CHECK_TYPE(py::isinstance<py::tuple>(obj), name, ": expected a tensor view tuple");
    auto t = obj.cast<py::tuple>();
    APT_CHECK_TYPE(t.size() == 5, name, ": tensor view tuple must have 5 fields, got ", t.size());
    TensorView v;
    v.name = name;
    v.data = reinterpret_cast<void*>(t[0].cast<uintptr_t>());
    int code = t[1].cast<int>();
    APT_CHECK_TYPE(code >= 0 && code <= 6, name, ": unknown dtype code ", code);
    v.dtype = static_cast<DType>(code);
    v.shape = t[2].cast<std::vector<int64_t>>();
    v.strides = t[3].cast<std::vector<int64_t>>();
    v.device = t[4].cast<int>();
    APT_CHECK(v.shape.size() == v.strides.size(), name, ": shape and strides differ in length");
    for (size_t i = 0; i < v.shape.size(); ++i) {
      APT_CHECK(v.shape[i] >= 0, name, ": negative size in dim ", i);
      APT_CHECK(v.strides[i] >= 0, name, ": negative stride in dim ", i);
    }
    APT_CHECK(v.data != nullptr || v.numel() == 0, name, ": null data pointer");
    return v;
  }

  // Optional argument: Python None -> empty view with data == nullptr.
  static TensorView from_optional(py::handle obj, const std::string& name) {
    if (obj.is_none()) { TensorView v; v.name = name; return v; }
    return from(obj, name);
  }
  bool defined() const { return data != nullptr || !shape.empty(); }
};

inline void check_ndim(const TensorView& t, int64_t nd) {
  APT_CHECK(t.ndim() == nd, t.name, ": expected ", nd, " dims, got ", t.ndim());
}
inline void check_shape(const TensorView& t, const std::vector<int64_t>& shape) {
  check_ndim(t, static_cast<int64_t>(shape.size()));
  for (size_t i = 0; i < shape.size(); ++i)
    APT_CHECK(t.shape[i] == shape[i], t.name, ": expected size ", shape[i], " in dim ", i, ", got ", t.shape[i]);
}
inline void check_float(const TensorView& t) {
  APT_CHECK_TYPE(t.dtype == DType::Float32 || t.dtype == DType::Float16 || t.dtype == DType::BFloat16 ||
                     t.dtype == DType::Float64,
                 t.name, ": expected a floating dtype, got ", dtype_name(t.dtype));
}
inline void check_dtype(const TensorView& t, DType d) {
  APT_CHECK_TYPE(t.dtype == d, t.name, ": expected dtype ", dtype_name(d), ", got ", dtype_name(t.dtype));
}
inline void check_cpu(const TensorView& t) {
  APT_CHECK(t.device == -1, t.name, ": expected a CPU tensor, got cuda:", t.device);
}
inline void check_cuda(const TensorView& t) {
  APT_CHECK(t.device >= 0, t.name, ": expected a CUDA tensor, got a CPU tensor");
}
// t is updated in place (or written: an output, `role` "is an output"): no two of its elements may share memory (an
// expanded or overlapping view would read one element's update as another's, or take the last of racing writes).
// The test of apt_kernels._validate.check_no_overlap: with the dims of size > 1 by increasing stride, each stride
// passes the span of the dims before it.
inline void check_no_overlap(const TensorView& t, const char* role = "is updated in place") {
  if (t.numel() == 0) return;  // nothing is written; torch gives empty tensors strides like (1, 1) for (S, 0)
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (int64_t i = 0; i < t.ndim(); ++i)
    if (t.shape[i] > 1) dims.emplace_back(t.strides[i], t.shape[i]);
  std::sort(dims.begin(), dims.end());
  int64_t span = 1;
  for (const auto& [stride, size] : dims) {
    APT_CHECK(stride >= span, t.name, ": ", role, ", so its elements must not share memory (an expanded or ",
              "overlapping view)");
    span += (size - 1) * stride;
  }
}

// ---- fp16 / bf16 <-> fp32 on the host (round-to-nearest-even) ----
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(BFloat16 h) { return bits_to_float(static_cast<uint32_t>(h.bits) << 16); }
inline BFloat16 bf16_from_float(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>(u >> 16)};
}

// fp16: branch-free (selects and float arithmetic only), so loops over fp16 rows vectorise; the branchy versions
// made an fp16 MoE combine 7x slower than bf16. Exact, and the same bits as torch's conversions.
inline float to_float(Half h) {
  const uint32_t w = static_cast<uint32_t>(h.bits) << 16, sign = w & 0x80000000u, two_w = w + w;
  // normal, inf and NaN: exponent and mantissa moved into place, exponent rebiased by 2^-112 (inf/NaN land on
  // exponent 255 before the scale and stay inf/NaN)
  const float normal = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // zero and subnormal (exponent 0): 0.5 with the mantissa in its low bits, minus 0.5, is mantissa * 2^-24 exactly
  const float subnormal = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t is_sub = 0u - static_cast<uint32_t>(two_w < (1u << 27));  // all ones: exponent 0 (masks, not a
  return bits_to_float(sign | (float_to_bits(subnormal) & is_sub) | (float_to_bits(normal) & ~is_sub));  // branch)
}
inline Half half_from_float(float f) {
  // Round to nearest even by the FPU: scaling by 2^112 then 2^-110 sends what overflows fp16 to inf, and adding
  // 2^(e+...) (a power of two picked from f's exponent, at least the fp16 subnormal quantum) leaves exactly the
  // rounded fp16 bits in the low mantissa. NaN -> the quiet NaN 0x7e00 with f's sign.
  const uint32_t w = float_to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t bias = std::max(shl1_w & 0xFF000000u, 0x71000000u);
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const uint32_t is_nan = 0u - static_cast<uint32_t>(shl1_w > 0xFF000000u);
  return Half{static_cast<uint16_t>((sign >> 16) | (0x7E00u & is_nan) | (nonsign & ~is_nan))};
}

// Accumulation type: fp32 for fp32/fp16/bf16 storage, fp64 for fp64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

template <typename T> inline acc_t<T> load_f(const T* p) { return static_cast<acc_t<T>>(*p); }
template <> inline float load_f<Half>(const Half* p) { return to_float(*p); }
template <> inline float load_f<BFloat16>(const BFloat16* p) { return to_float(*p); }
template <typename T> inline void store_f(T* p, acc_t<T> v) { *p = static_cast<T>(v); }
template <> inline void store_f<Half>(Half* p, float v) { *p = half_from_float(v); }
template <> inline void store_f<BFloat16>(BFloat16* p, float v) { *p = bf16_from_float(v); }

// Calls f(T{}) with T the C++ type of a floating dtype (fp32/fp16/bf16/fp64).
template <typename F>
void dispatch_float(DType d, const std::string& name, F&& f) {
  switch (d) {
    case DType::Float32: f(float{}); break;
    case DType::Float64: f(double{}); break;
    case DType::Float16: f(Half{}); break;
    case DType::BFloat16: f(BFloat16{}); break;
    default: throw py::type_error(str_cat(name, ": expected a floating dtype, got ", dtype_name(d)));
  }
}

// ---- op registration: each family's binding file adds itself; module.cpp calls them all ----
using RegisterFn = void (*)(py::module_&);
struct OpFamily { const char* name; RegisterFn fn; };
std::vector<OpFamily>& op_families();
struct OpRegistrar {
  OpRegistrar(const char* name, RegisterFn fn) { op_families().push_back({name, fn}); }
};

}  // namespace apt

// Usage in csrc/<family>/<family>_bindings.cpp:  APT_REGISTER_OPS(scan) { m.def(...); }
#define APT_REGISTER_OPS(family)                                                     \
  static void apt_register_##family(::pybind11::module_& m);                         \
  static ::apt::OpRegistrar apt_registrar_##family(#family, apt_register_##family); \
  static void apt_register_##family(::pybind11::module_& m)
