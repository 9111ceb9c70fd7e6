// Fused TVA attention on CUDA: o = softmax(q kᵀ·scale + mask) v + coef·gate·delta, FlashAttention-2 style. This
// file: the fp32 kernels (FMA math; fp16/bf16 run on tensor cores in tva_cuda_tc.cu), the launchers of both, and the
// backward's preprocess shared by both (Di, dDelta, Σ delta·dO). fp32: one block per (64 query rows, batch·head),
// K/V tiles staged in shared memory, online softmax in registers, the perturbation added before the single write of
// o, LSE saved; backward = dK/dV per key block and dQ per query block, recomputing P from the LSE. Any strides;
// head dims 32/64/128 (D/32 threads share one row, reducing dot products with warp shuffles).
// Design limits, each rejected with a ValueError (tva_cpu.cpp's cuda_params / grid_1d), never computed wrong:
// head dim 32, 64 or 128 only (other sizes: the Triton or reference implementations); B·H·ceil(T/64) thread blocks
// <= 2^31 - 1 (a 1-d grid, so B·H is not bound by gridDim.y's 65535). Static shared memory stays under the 48 KB
// default (forward/dQ: 2·32·D fp32 tiles = 32 KB at D = 128), so no cudaFuncSetAttribute opt-in is needed.
#include <cmath>
#include <stdexcept>
#include <string>

#include "common/apt_cuda.cuh"
#include "tva/tva_common.h"
#include "tva/tva_cuda.h"
#include "tva/tva_cuda_impl.cuh"

namespace apt {
namespace tva {
namespace {

using cuda::from_f;
using cuda::to_f;

constexpr int BM = 64;   // query rows per block (forward, dQ); key rows per block (dK/dV)
constexpr int BN = 32;   // rows per shared-memory tile
constexpr int EPT = 32;  // head-dim elements held per thread; TPR = D / EPT threads share a row

template <int TPR>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int o = TPR / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// rows [r0, r0 + BN) of a (B, H, T, D) tensor -> smem fp32 [BN][D] (zeros past T), optionally scaled
template <typename T, int D>
__device__ void load_tile(const void* src, const int64_t* s, int64_t b, int64_t h, int64_t r0, int64_t T_,
                          float (*dst)[D], float mul) {
  const T* x = static_cast<const T*>(src);
  for (int idx = threadIdx.x; idx < BN * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    const int64_t t = r0 + r;
    dst[r][d] = t < T_ ? to_f(x[off4(s, b, h, t, d)]) * mul : 0.f;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(BM*(D / EPT)) tva_fwd_kernel(const CudaParams p) {
  constexpr int TPR = D / EPT;
  __shared__ float Ks[BN][D];
  __shared__ float Vs[BN][D];
  __shared__ bool Kok[BN];
  const BlockRows blk = block_rows(p, p.Tq, BM);  // 1-d grid: B·H may exceed gridDim.y's 65535
  const int64_t bh = blk.bh, b = blk.b, h = blk.h, m0 = blk.r0;
  const int row = threadIdx.x / TPR, part = threadIdx.x % TPR;
  const int64_t i = m0 + row;
  const bool row_ok = i < p.Tq;
  const int64_t pos = i + p.Tk - p.Tq;
  const MaskSpec ms = mask_of(p);
  const T* q = static_cast<const T*>(p.q);
  float qr[EPT], acc[EPT];
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
    qr[e] = row_ok ? to_f(q[off4(p.sq, b, h, i, e * TPR + part)]) * p.scale : 0.f;
    acc[e] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const KeyBlocks kb = key_blocks(ms, m0, BM, BN);
  for (int64_t it = 0; it < kb.count(); ++it) {
    const int64_t n0 = kb.start(it, BN);
    __syncthreads();  // the previous tile is no longer read
    load_tile<T, D>(p.k, p.sk, b, h, n0, p.Tk, Ks, 1.f);
    load_tile<T, D>(p.v, p.sv, b, h, n0, p.Tk, Vs, 1.f);
    for (int j = threadIdx.x; j < BN; j += blockDim.x) Kok[j] = key_ok(p, b, n0 + j);
    __syncthreads();
    float s[BN];
    float mx = m;
#pragma unroll
    for (int j = 0; j < BN; ++j) {
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < EPT; ++e) dot += qr[e] * Ks[j][e * TPR + part];
      dot = group_sum<TPR>(dot);
      const bool ok = row_ok && Kok[j] && visible(ms, pos, n0 + j);
      s[j] = ok ? dot : -INFINITY;
      mx = fmaxf(mx, s[j]);
    }
    // rows with no visible key so far keep m = -inf: subtract 0 so exp gives 0, never NaN
    const float msafe = mx == -INFINITY ? 0.f : mx;
    const float alpha = expf(m - msafe);
    l *= alpha;
#pragma unroll
    for (int e = 0; e < EPT; ++e) acc[e] *= alpha;
#pragma unroll
    for (int j = 0; j < BN; ++j) {
      const float pj = expf(s[j] - msafe);
      l += pj;
#pragma unroll
      for (int e = 0; e < EPT; ++e) acc[e] += pj * Vs[j][e * TPR + part];
    }
    m = mx;
  }
  if (!row_ok) return;
  const float inv = l > 0.f ? 1.f / l : 0.f;
  const float cg = coef_gate<T>(p, b, h, i);
  T* o = static_cast<T*>(p.o);
  T* at = static_cast<T*>(p.attn);
  const T* dl = static_cast<const T*>(p.delta);
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
    const int d = e * TPR + part;
    float val = acc[e] * inv;
    if (at != nullptr) at[off4(p.sa, b, h, i, d)] = from_f<T>(val);
    if (dl != nullptr) val += cg * to_f(dl[off4(p.sdl, b, h, i, d)]);
    o[off4(p.so, b, h, i, d)] = from_f<T>(val);
  }
  if (part == 0) p.lse[bh * p.Tq + i] = l > 0.f ? m + logf(l) : INFINITY;
}

// Di = Σ_d dO·A (A: the attention part the forward saved); dDelta = coef·gate·dO; rowdot = Σ_d delta·dO. One
// thread per row.
template <typename T>
__global__ void tva_bwd_pre_kernel(const CudaParams p, float* di) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= p.B * p.H * p.Tq) return;
  const int64_t t = r % p.Tq, bh = r / p.Tq, b = bh / p.H, h = bh % p.H;
  const T* go = static_cast<const T*>(p.go);
  const T* at = static_cast<const T*>(p.attn);
  const T* dl = static_cast<const T*>(p.delta);
  const float cg = coef_gate<T>(p, b, h, t);
  float acc = 0.f, rd = 0.f;
  for (int64_t d = 0; d < p.D; ++d) {
    const float g = to_f(go[off4(p.sgo, b, h, t, d)]);
    const float a = to_f(at[off4(p.sa, b, h, t, d)]);
    if (dl != nullptr) {
      const float x = to_f(dl[off4(p.sdl, b, h, t, d)]);
      rd += x * g;
      static_cast<T*>(p.ddelta)[off4(p.sdd, b, h, t, d)] = from_f<T>(cg * g);
    }
    acc += g * a;
  }
  di[r] = acc;
  if (dl != nullptr) p.rowdot[r] = rd;
}

// dK, dV for BM keys (a thread group per key), looping over the query tiles that can see them.
template <typename T, int D>
__global__ void __launch_bounds__(BM*(D / EPT)) tva_bwd_dkdv_kernel(const CudaParams p, const float* di) {
  constexpr int TPR = D / EPT;
  __shared__ float Qs[BN][D];
  __shared__ float Gs[BN][D];
  __shared__ float Ls[BN], Ds[BN];
  const BlockRows blk = block_rows(p, p.Tk, BM);  // key blocks
  const int64_t bh = blk.bh, b = blk.b, h = blk.h, n0 = blk.r0;
  const int row = threadIdx.x / TPR, part = threadIdx.x % TPR;
  const int64_t j = n0 + row;
  const bool kok = key_ok(p, b, j);
  const MaskSpec ms = mask_of(p);
  const int64_t off = p.Tk - p.Tq;
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  float kr[EPT], vr[EPT], dk[EPT], dv[EPT];
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
    const int d = e * TPR + part;
    kr[e] = j < p.Tk ? to_f(k[off4(p.sk, b, h, j, d)]) : 0.f;
    vr[e] = j < p.Tk ? to_f(v[off4(p.sv, b, h, j, d)]) : 0.f;
    dk[e] = dv[e] = 0.f;
  }
  int64_t i_lo, i_hi;
  query_range(ms, n0, BM, &i_lo, &i_hi);
  for (int64_t m0 = (i_lo / BN) * BN; m0 < i_hi; m0 += BN) {
    __syncthreads();
    load_tile<T, D>(p.q, p.sq, b, h, m0, p.Tq, Qs, p.scale);
    load_tile<T, D>(p.go, p.sgo, b, h, m0, p.Tq, Gs, 1.f);
    for (int r = threadIdx.x; r < BN; r += blockDim.x) {
      const int64_t t = m0 + r;
      Ls[r] = t < p.Tq ? p.lse[bh * p.Tq + t] : INFINITY;
      Ds[r] = t < p.Tq ? di[bh * p.Tq + t] : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int r = 0; r < BN; ++r) {
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
        s += Qs[r][e * TPR + part] * kr[e];
        dp += Gs[r][e * TPR + part] * vr[e];
      }
      s = group_sum<TPR>(s);
      dp = group_sum<TPR>(dp);
      const int64_t t = m0 + r;
      const bool ok = kok && t < p.Tq && visible(ms, t + off, j);
      const float pr = ok ? expf(s - Ls[r]) : 0.f;
      const float ds = pr * (dp - Ds[r]);
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
        dv[e] += pr * Gs[r][e * TPR + part];
        dk[e] += ds * Qs[r][e * TPR + part];  // Qs holds q·scale, so this is already scale·dSᵀQ
      }
    }
  }
  if (j >= p.Tk) return;
  T* dkp = static_cast<T*>(p.dk);
  T* dvp = static_cast<T*>(p.dv);
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
    const int d = e * TPR + part;
    dkp[off4(p.sdk, b, h, j, d)] = from_f<T>(dk[e]);
    dvp[off4(p.sdv, b, h, j, d)] = from_f<T>(dv[e]);
  }
}

// dQ for BM query rows, looping over the same key tiles as the forward.
template <typename T, int D>
__global__ void __launch_bounds__(BM*(D / EPT)) tva_bwd_dq_kernel(const CudaParams p, const float* di) {
  constexpr int TPR = D / EPT;
  __shared__ float Ks[BN][D];
  __shared__ float Vs[BN][D];
  __shared__ bool Kok[BN];
  const BlockRows blk = block_rows(p, p.Tq, BM);  // 1-d grid: B·H may exceed gridDim.y's 65535
  const int64_t bh = blk.bh, b = blk.b, h = blk.h, m0 = blk.r0;
  const int row = threadIdx.x / TPR, part = threadIdx.x % TPR;
  const int64_t i = m0 + row;
  const bool row_ok = i < p.Tq;
  const int64_t pos = i + p.Tk - p.Tq;
  const MaskSpec ms = mask_of(p);
  const T* q = static_cast<const T*>(p.q);
  const T* go = static_cast<const T*>(p.go);
  float qr[EPT], gr[EPT], dq[EPT];
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
    const int d = e * TPR + part;
    qr[e] = row_ok ? to_f(q[off4(p.sq, b, h, i, d)]) * p.scale : 0.f;
    gr[e] = row_ok ? to_f(go[off4(p.sgo, b, h, i, d)]) : 0.f;
    dq[e] = 0.f;
  }
  const float lse = row_ok ? p.lse[bh * p.Tq + i] : INFINITY;
  const float dii = row_ok ? di[bh * p.Tq + i] : 0.f;
  const KeyBlocks kb = key_blocks(ms, m0, BM, BN);
  for (int64_t it = 0; it < kb.count(); ++it) {
    const int64_t n0 = kb.start(it, BN);
    __syncthreads();
    load_tile<T, D>(p.k, p.sk, b, h, n0, p.Tk, Ks, 1.f);
    load_tile<T, D>(p.v, p.sv, b, h, n0, p.Tk, Vs, 1.f);
    for (int j = threadIdx.x; j < BN; j += blockDim.x) Kok[j] = key_ok(p, b, n0 + j);
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < BN; ++j) {
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
        s += qr[e] * Ks[j][e * TPR + part];
        dp += gr[e] * Vs[j][e * TPR + part];
      }
      s = group_sum<TPR>(s);
      dp = group_sum<TPR>(dp);
      const bool ok = row_ok && Kok[j] && visible(ms, pos, n0 + j);
      const float ds = ok ? expf(s - lse) * (dp - dii) : 0.f;
#pragma unroll
      for (int e = 0; e < EPT; ++e) dq[e] += ds * Ks[j][e * TPR + part];
    }
  }
  if (!row_ok) return;
  T* dqp = static_cast<T*>(p.dq);
#pragma unroll
  for (int e = 0; e < EPT; ++e) dqp[off4(p.sdq, b, h, i, e * TPR + part)] = from_f<T>(dq[e] * p.scale);
}

void check_dtype(const CudaParams& p) {
  if (p.dtype < 0 || p.dtype > 2) throw std::invalid_argument("q: the TVA CUDA kernels take float32/float16/bfloat16");
}

}  // namespace

void tva_forward_cuda(const CudaParams& p, uintptr_t stream) {
  check_dtype(p);
  if (p.B * p.H * p.Tq == 0) return;
  cuda::DeviceGuard guard(p.device);
  cudaStream_t s = cuda::as_stream(stream);
  if (p.dtype != 0) return tva_forward_cuda_tc(p, s);
  const unsigned grid = grid_1d(p, cdiv(p.Tq, BM), BM);
  dispatch_head_dim(p.D, [&](auto dim) {  // fp32: fp16/bf16 went to tva_cuda_tc.cu
    constexpr int D = decltype(dim)::value;
    tva_fwd_kernel<float, D><<<grid, BM * (D / EPT), 0, s>>>(p);
  });
  APT_CUDA_CHECK(cudaGetLastError());
}

void tva_backward_cuda(const CudaParams& p, uintptr_t stream) {
  check_dtype(p);
  // Tq == 0 < Tk still has dk = dv = 0 to write (the outputs are uninitialised torch.empty)
  if (p.B * p.H * p.Tk == 0) return;
  cuda::DeviceGuard guard(p.device);
  cudaStream_t s = cuda::as_stream(stream);
  const int64_t rows = p.B * p.H * p.Tq;
  // di (rowsum(dO * A)) comes from the caller (torch's caching allocator: counted in its memory stats, reused,
  // no allocation of ours inside a captured graph)
  float* di = p.di;
  if (rows > 0) {  // a zero-block grid is an invalid launch configuration
    const unsigned g = static_cast<unsigned>(cdiv(rows, 256));
    switch (p.dtype) {
      case 0: tva_bwd_pre_kernel<float><<<g, 256, 0, s>>>(p, di); break;
      case 1: tva_bwd_pre_kernel<__half><<<g, 256, 0, s>>>(p, di); break;
      default: tva_bwd_pre_kernel<__nv_bfloat16><<<g, 256, 0, s>>>(p, di); break;
    }
    APT_CUDA_CHECK(cudaGetLastError());
  }
  if (p.dtype != 0) return tva_backward_cuda_tc(p, s, di);
  const unsigned gk = grid_1d(p, cdiv(p.Tk, BM), BM), gq = grid_1d(p, cdiv(p.Tq, BM), BM);
  dispatch_head_dim(p.D, [&](auto dim) {  // fp32: fp16/bf16 went to tva_cuda_tc.cu
    constexpr int D = decltype(dim)::value;
    tva_bwd_dkdv_kernel<float, D><<<gk, BM * (D / EPT), 0, s>>>(p, di);
    APT_CUDA_CHECK(cudaGetLastError());
    if (rows > 0) {
      tva_bwd_dq_kernel<float, D><<<gq, BM * (D / EPT), 0, s>>>(p, di);
      APT_CUDA_CHECK(cudaGetLastError());
    }
  });
}

}  // namespace tva
}  // namespace apt
