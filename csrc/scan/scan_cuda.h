// Host interface of the selective-scan CUDA kernels (scan_cuda_fwd.cu, scan_cuda_bwd.cu), callable from plain C++
// (no CUDA headers). u/delta/z/out and their grads: fp32/fp16/bf16 (apt::DType codes), any element strides;
// A (dim, N), B/C (dim, N) or packed (batch, G, L, N), D, delta_bias (dim,), checkpoints (batch, dim, nchunks, N),
// last state and dlast (batch, dim, N), gradient sums: contiguous fp32. Bound to Python in scan_cuda_bindings.cpp.
#pragma once
#include <cstdint>

namespace apt {
namespace scan_cuda {

constexpr int64_t kMaxN = 128;      // lanes per channel (<= 32) x states per lane (<= 4)
constexpr int64_t kMaxChunk = 64;   // steps between checkpoints: the backward keeps one chunk of states on chip

struct ScanParams {
  int dtype = 0;  // DType code of u/delta/z/out/dout/du/ddelta/dz
  int device = 0;
  int64_t batch = 0, dim = 0, L = 0, N = 0, chunk = 64;
  int64_t gB = 0, gC = 0;  // 0: (dim, N) constant; else number of groups of the packed (batch, G, L, N) layout
  bool softplus = false;
  const void *u = nullptr, *delta = nullptr, *z = nullptr;  // z optional
  int64_t su[3] = {}, sdelta[3] = {}, sz[3] = {};
  const float *A = nullptr, *B = nullptr, *C = nullptr, *D = nullptr, *bias = nullptr;  // D, bias optional
  float* ckpt = nullptr;  // forward writes, backward reads
  // forward
  void* out = nullptr;
  int64_t sout[3] = {};
  float* last = nullptr;
  // Parallel over L: the chunks are cut into ceil(nchunks / chunks_per_split) splits; with more than one, a first
  // pass writes one (batch*dim, splits-1, N) fp32 workspace entry per split and each split's sum of dt
  // (seg_dt (batch*dim, splits-1)), and the main pass starts every split from the combination of the others.
  // Forward: seg_state[split s < S-1] = the end state of s from h = 0; the main pass folds in the earlier splits.
  // Backward: seg_state[s - 1] (s >= 1) = the adjoint at the start of split s from a zero adjoint at its end; the
  // main pass folds in the later splits.
  int64_t chunks_per_split = 1 << 30;
  float *seg_state = nullptr, *seg_dt = nullptr;
  // backward
  const void* dout = nullptr;
  int64_t sdout[3] = {};
  const float* dlast = nullptr;  // optional
  void *du = nullptr, *ddelta = nullptr, *dz = nullptr;
  int64_t sdu[3] = {}, sddelta[3] = {}, sdz[3] = {};
  float *dA = nullptr, *dB = nullptr, *dC = nullptr, *dD = nullptr, *dbias = nullptr;  // zeroed by the caller
};

struct StepParams {
  int dtype = 0;        // x/dt/z/y
  int state_dtype = 0;  // state, any strides, updated in place
  int device = 0;
  int64_t batch = 0, dim = 0, N = 0, gB = 1, gC = 1;  // B/C packed (batch, G, 1, N)
  bool softplus = false;
  void* state = nullptr;
  int64_t sstate[3] = {};
  const void *x = nullptr, *dt = nullptr, *z = nullptr;
  int64_t sx[2] = {}, sdt[2] = {}, sz[2] = {};
  const float *A = nullptr, *B = nullptr, *C = nullptr, *D = nullptr, *bias = nullptr;
  void* y = nullptr;
  int64_t sy[2] = {};
};

void selective_scan_fwd(const ScanParams& p, uintptr_t stream);
void selective_scan_bwd(const ScanParams& p, uintptr_t stream);
void selective_state_update(const StepParams& p, uintptr_t stream);

}  // namespace scan_cuda
}  // namespace apt
