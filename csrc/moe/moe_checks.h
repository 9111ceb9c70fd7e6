// Argument checks shared by the MoE CPU and CUDA bindings (raise ValueError/TypeError naming the argument).
#pragma once
#include "common/apt_common.h"

#include <limits>

namespace apt {
namespace moe {

inline void check_contiguous(const TensorView& t) {
  if (t.numel() == 0) return;  // nothing is indexed; torch gives empty tensors strides like (1, 1) for (S, 0)
  int64_t expect = 1;
  for (int64_t i = t.ndim() - 1; i >= 0; --i) {
    if (t.shape[i] != 1) APT_CHECK(t.strides[i] == expect, t.name, ": expected a contiguous tensor");
    expect *= t.shape[i];
  }
}

inline void check_device(const TensorView& t, int device) {
  if (device < 0) check_cpu(t);
  else APT_CHECK(t.device == device, t.name, ": expected device cuda:", device, ", got ",
                 t.device < 0 ? std::string("cpu") : "cuda:" + std::to_string(t.device));
}

// int64, contiguous, given shape, on `device` (-1 = CPU)
inline void check_index(const TensorView& t, const std::vector<int64_t>& shape, int device = -1) {
  check_shape(t, shape);
  check_dtype(t, DType::Int64);
  check_device(t, device);
  check_contiguous(t);
}

// The routing capacity: -1 (dropless) or >= 0 with num_experts * cap slots in int64 (a wrapped product let a short
// token_of_slot pass its shape check, then slot e * cap + p was written out of bounds).
inline void check_capacity(int64_t cap, int64_t num_experts) {
  APT_CHECK(cap >= -1, "cap: expected -1 (dropless) or a capacity >= 0, got ", cap);
  APT_CHECK(cap <= std::numeric_limits<int64_t>::max() / num_experts, "cap: expected num_experts (", num_experts,
            ") * cap to fit int64, got cap ", cap);
}

}  // namespace moe
}  // namespace apt
