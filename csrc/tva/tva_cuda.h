// Host-side interface of the fused TVA attention CUDA kernels (tva_cuda.cu): raw pointers + element strides,
// bound to Python from tva_cpu.cpp under APT_WITH_CUDA. Head dims 32/64/128; fp32/fp16/bf16 (dtype codes of
// apt_common.h); gate in the inputs' dtype; coef a device fp32 scalar; pad a (B, Tk) bool mask or null.
#pragma once

#include <cstdint>

namespace apt {
namespace tva {

struct CudaParams {
  int dtype = 0;  // 0 float32, 1 float16, 2 bfloat16
  int device = 0;
  int64_t B = 0, H = 0, Tq = 0, Tk = 0, D = 0, window = 0, sinks = 0;
  bool causal = true;
  float scale = 1.f;
  const void *q = nullptr, *k = nullptr, *v = nullptr, *delta = nullptr, *gate = nullptr;
  const float* coef = nullptr;
  const bool* pad = nullptr;
  int64_t sq[4] = {}, sk[4] = {}, sv[4] = {}, sdl[4] = {}, sg[3] = {}, sp[2] = {};
  void* o = nullptr;  // forward output
  int64_t so[4] = {};
  // the attention part A = softmax(q kᵀ) v before the perturbation: forward, written when not null (training with
  // delta); backward, read for Di = Σ dO·A (A = o without delta)
  void* attn = nullptr;
  int64_t sa[4] = {};
  float* lse = nullptr;  // (B, H, Tq) contiguous
  // backward only
  const void* go = nullptr;
  int64_t sgo[4] = {};
  void *dq = nullptr, *dk = nullptr, *dv = nullptr, *ddelta = nullptr;
  int64_t sdq[4] = {}, sdk[4] = {}, sdv[4] = {}, sdd[4] = {};
  float* rowdot = nullptr;  // (B, H, Tq) contiguous, with delta
  float* di = nullptr;      // (B, H, Tq) contiguous fp32 scratch: rowsum(dO * A), from the caller's allocator
};

void tva_forward_cuda(const CudaParams& p, uintptr_t stream);
void tva_backward_cuda(const CudaParams& p, uintptr_t stream);

}  // namespace tva
}  // namespace apt
