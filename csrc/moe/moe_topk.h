// The top-k order of the MoE router, shared by the CPU (moe_cpu.cpp) and CUDA (moe_cuda.cu) kernels: the order of
// the reference's stable descending sort (apt_kernels/reference/moe.py, topk_ref), which ranks NaN above every
// number. Scanning experts by increasing index and inserting with this strict comparison keeps equal values, and
// NaN next to NaN, in index order: ties go to the lower expert.
#pragma once

#if defined(__CUDACC__)
#define APT_MOE_HD __host__ __device__ __forceinline__
#else
#define APT_MOE_HD inline
#endif

namespace apt {
namespace moe {

// a ranks before b: a is NaN and b is not, or a > b (false for equal values and for two NaNs)
template <typename P>
APT_MOE_HD bool ranks_before(P a, P b) {
  return (a != a && b == b) || a > b;
}

}  // namespace moe
}  // namespace apt
