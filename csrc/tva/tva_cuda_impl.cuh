// Internals shared by the two CUDA TVA kernel files: tva_cuda.cu (fp32, FMA) and tva_cuda_tc.cu (fp16/bf16, tensor
// cores). Not part of the host interface (tva_cuda.h).
#pragma once
#include <cstdint>
#include <string>
#include <stdexcept>
#include <type_traits>

#include "common/apt_cuda.cuh"
#include "tva/tva_common.h"
#include "tva/tva_cuda.h"

namespace apt {
namespace tva {

__device__ __forceinline__ int64_t off4(const int64_t* s, int64_t b, int64_t h, int64_t t, int64_t d) {
  return b * s[0] + h * s[1] + t * s[2] + d * s[3];
}

__device__ __forceinline__ bool key_ok(const CudaParams& p, int64_t b, int64_t j) {
  return j < p.Tk && !(p.pad != nullptr && p.pad[b * p.sp[0] + j * p.sp[1]]);
}

__device__ __forceinline__ MaskSpec mask_of(const CudaParams& p) {
  return MaskSpec{p.Tq, p.Tk, p.window, p.sinks, p.causal};
}

// This thread block's batch·head and first row, in a 1-d grid of ceil(T_ / rows) blocks per batch·head (grid_1d)
struct BlockRows {
  int64_t bh, b, h, r0;
};
__device__ __forceinline__ BlockRows block_rows(const CudaParams& p, int64_t T_, int64_t rows) {
  const int64_t nb = cdiv(T_, rows), bh = blockIdx.x / nb;
  return BlockRows{bh, bh / p.H, bh % p.H, (blockIdx.x % nb) * rows};
}

// coef · gate[b, i, h]: the perturbation's factor for query row i (0 without delta); T the inputs' dtype
template <typename T>
__device__ __forceinline__ float coef_gate(const CudaParams& p, int64_t b, int64_t h, int64_t i) {
  if (p.delta == nullptr) return 0.f;
  float cg = *p.coef;
  if (p.gate != nullptr) cg *= cuda::to_f(static_cast<const T*>(p.gate)[b * p.sg[0] + i * p.sg[1] + h * p.sg[2]]);
  return cg;
}

// f(std::integral_constant<int, D>) for the head dims the CUDA kernels are built for
template <typename F>
void dispatch_head_dim(int64_t D, F&& f) {
  switch (D) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: throw std::invalid_argument("q: the TVA CUDA kernels take head dims 32, 64, 128");
  }
}

// Every pair of query rows [i0, i1) × keys [j0, j1) exists and is visible, and there is no padding mask: the tile
// needs no per-element mask (the bounds of a tile, not clipped to Tq / Tk). Sinks need no case of their own: the
// window bounds below, met by the tile's extreme keys, hold for every key of it.
__device__ __forceinline__ bool tile_unmasked(const CudaParams& p, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  if (p.pad != nullptr || i1 > p.Tq || j1 > p.Tk) return false;
  const int64_t off = p.Tk - p.Tq, pmin = i0 + off, pmax = i1 - 1 + off;
  if (p.causal && j1 - 1 > pmin) return false;
  if (p.window > 0 && j1 > p.sinks) {
    if (pmax - j0 >= p.window) return false;                      // p - j < window for all pairs
    if (!p.causal && (j1 - 1) - pmin >= p.window) return false;  // j - p < window for all pairs
  }
  return true;
}

// 1-d grid of `blocks` per (batch, head): gridDim.x allows 2^31 - 1 blocks, gridDim.y only 65535
inline unsigned grid_1d(const CudaParams& p, int64_t blocks, int64_t rows_per_block) {
  const int64_t n = p.B * p.H * blocks;
  if (n > 0x7fffffffLL)
    throw std::invalid_argument("q: B·H·ceil(T/" + std::to_string(rows_per_block) + ") = " + std::to_string(n) +
                                " thread blocks exceed the CUDA grid limit (2^31 - 1)");
  return static_cast<unsigned>(n);
}

// tva_cuda_tc.cu: fp16/bf16 forward, and the backward's dK/dV and dQ passes after tva_cuda.cu's preprocess (di)
void tva_forward_cuda_tc(const CudaParams& p, cudaStream_t s);
void tva_backward_cuda_tc(const CudaParams& p, cudaStream_t s, const float* di);

}  // namespace tva
}  // namespace apt
