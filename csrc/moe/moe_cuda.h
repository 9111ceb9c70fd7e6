// Host launchers of the MoE CUDA kernels (moe_cuda.cu), callable from plain C++ (no CUDA headers needed).
// Index tensors are contiguous int64; value rows have unit stride along C with row stride given; weights are
// contiguous (N, k) fp32; `dtype` is the apt::DType code of the value tensors (fp32/fp16/bf16). All run on `stream`,
// which belongs to CUDA device `device` (made current for the call, the caller's device restored after).
#pragma once
#include <cstdint>

namespace apt {
namespace moe_cuda {

constexpr int kMaxK = 16;                // top-k keeps its candidates in registers (a template bound)
constexpr int64_t kMaxExperts = 8192;    // per-block expert counts live in shared memory
constexpr int64_t kRouteBlock = 256;     // tokens per block in the position passes

// work: int64 scratch of k * ceil(N / kRouteBlock) * E + E elements.
void route(const float* probs, int64_t N, int64_t E, int64_t stride_n, int64_t stride_e, int64_t k, int64_t cap,
           int64_t* expert_idx, int64_t* position, int64_t* slot, int64_t* token_of_slot, int64_t num_slots,
           int64_t* tokens_per_expert, int64_t* work, int device, uintptr_t stream);
void dispatch(int dtype, const void* x, int64_t N, int64_t C, int64_t stride_x, const int64_t* token_of_slot,
              int64_t S, void* buf, int device, uintptr_t stream);
void dispatch_backward(int dtype, const void* grad_buf, int64_t S, int64_t C, int64_t stride_g, const int64_t* slot,
                       int64_t N, int64_t k, void* grad_x, int device, uintptr_t stream);
void combine(int dtype, const void* out, int64_t S, int64_t C, int64_t stride_o, const float* weights,
             const int64_t* slot, int64_t N, int64_t k, void* y, int device, uintptr_t stream);
void combine_backward(int dtype, const void* grad_y, int64_t stride_gy, const void* out, int64_t stride_o, int64_t S,
                      int64_t C, const float* weights, const int64_t* slot, const int64_t* token_of_slot, int64_t N,
                      int64_t k, void* grad_out, float* grad_weights, int device, uintptr_t stream);

}  // namespace moe_cuda
}  // namespace apt
