// MoE routing (top-k with ties to the lower expert, GShard-priority queue positions by per-block expert counts +
// exclusive scan over (rank, block) units, capacity drops), dispatch and combine with backwards, in CUDA.
// Layouts as in moe_cuda.h; k <= 16, E <= 8192; fp32/fp16/bf16 values with fp32 accumulation. Indices read from
// Python are bounds-checked in the kernels (an out-of-range row is treated as empty, never dereferenced).
#include "common/apt_cuda.cuh"
#include "moe/moe_cuda.h"
#include "moe/moe_topk.h"

#include <initializer_list>
#include <stdexcept>
#include <type_traits>

namespace apt {
namespace moe_cuda {
namespace {

using apt::cuda::from_f;
using apt::cuda::to_f;

inline unsigned blocks_for(int64_t n, int64_t per) { return static_cast<unsigned>((n + per - 1) / per); }
// 16 / sizeof(T) when every base pointer is 16-byte aligned and C and every row stride are multiples of it, so that
// each row starts aligned; else 1 (see Pack)
template <typename T>
inline int row_vec(int64_t C, std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  if (C % kVec) return 1;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16) return 1;
  for (int64_t st : strides)
    if (st % kVec) return 1;
  return kVec;
}

// f(std::integral_constant<int, VEC>) for VEC = vec (16 / sizeof(T)) or 1
template <typename T, typename F>
inline void by_vec(int vec, F&& f) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  if (vec == kVec) f(std::integral_constant<int, kVec>{});
  else f(std::integral_constant<int, 1>{});
}

inline int row_threads(int64_t C) {
  int64_t t = ((C + 31) / 32) * 32;
  return static_cast<int>(t < 32 ? 32 : (t > 256 ? 256 : t));
}

// One token per thread. The candidates live in registers: with K a compile-time bound every index below is a
// constant after unrolling (a runtime-indexed array went to local memory: a 192-byte stack frame, and a local load
// of the k-th best for every expert of every token). k <= K is the runtime count.
template <int K>
__global__ void topk_kernel(const float* __restrict__ p, int64_t N, int64_t E, int64_t sn, int64_t se, int k,
                            int64_t* __restrict__ idx) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  float bv[K];
  int be[K];  // E <= kMaxExperts: int32
#pragma unroll
  for (int j = 0; j < K; ++j) {  // never read before written; set so that nothing reads uninitialised registers
    bv[j] = 0.f;
    be[j] = 0;
  }
  int filled = 0;
  float worst = 0.f;  // bv[k - 1] once filled == k
  const float* row = p + n * sn;
  for (int64_t e = 0; e < E; ++e) {
    float cv = row[e * se];
    if (filled == k && !moe::ranks_before(cv, worst)) continue;
    int ce = static_cast<int>(e);
    const int lim = filled < k ? filled + 1 : k;  // slots in use after this insertion
    bool shifting = false;
    // strict comparison (NaN above every number): an equal value never overtakes a lower expert already kept;
    // from the insertion point on every kept candidate moves down one slot (the last falls off when full)
#pragma unroll
    for (int j = 0; j < K; ++j) {
      if (j < lim && (shifting || j == filled || moe::ranks_before(cv, bv[j]))) {
        const float tv = bv[j];
        const int te = be[j];
        bv[j] = cv;
        be[j] = ce;
        cv = tv;
        ce = te;
        shifting = true;
      }
      if (j == k - 1) worst = bv[j];
    }
    if (filled < k) ++filled;
  }
#pragma unroll
  for (int j = 0; j < K; ++j)
    if (j < k) idx[n * k + j] = be[j];
}

// counts of each expert among rank-j choices of token block b -> work[(j * nb + b) * E + e]
__global__ void count_kernel(const int64_t* __restrict__ idx, int64_t N, int64_t E, int64_t k, int64_t nb,
                             int64_t* __restrict__ work) {
  APT_DYNAMIC_SMEM(int, sh_count);
  const int64_t b = blockIdx.x, j = blockIdx.y;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) sh_count[e] = 0;
  __syncthreads();
  const int64_t n = b * kRouteBlock + threadIdx.x;
  if (n < N) atomicAdd(&sh_count[idx[n * k + j]], 1);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) work[(j * nb + b) * E + e] = sh_count[e];
}

// Exclusive prefix sums of in[i * stride] (i < count) into out[i * stride] (out may be in: each thread reads its
// element before it writes it), by one whole block of kScanThreads threads, a tile of kScanThreads elements at a
// time (a Hillis-Steele scan in shared memory, carried across tiles). Returns the total, to every thread.
constexpr int kScanThreads = 256;
__device__ int64_t block_exclusive_scan(const int64_t* in, int64_t* out, int64_t count, int64_t stride) {
  __shared__ int64_t sh[kScanThreads];
  const int tid = threadIdx.x;
  int64_t carry = 0;
  for (int64_t i0 = 0; i0 < count; i0 += kScanThreads) {
    const int64_t i = i0 + tid;
    const int64_t c = i < count ? in[i * stride] : 0;
    sh[tid] = c;
    __syncthreads();
    for (int off = 1; off < kScanThreads; off <<= 1) {
      const int64_t v = tid >= off ? sh[tid - off] : 0;
      __syncthreads();
      sh[tid] += v;
      __syncthreads();
    }
    if (i < count) out[i * stride] = carry + sh[tid] - c;
    carry += sh[kScanThreads - 1];
    __syncthreads();  // every thread has read sh[last] before the next tile overwrites sh
  }
  return carry;
}

// one block per expert e: exclusive scan of its counts over the units in priority order (in place), and its total
// (parallel over the units: k·N/256 of them, 512 at N = 64K, k = 2, which one thread per expert walked serially)
__global__ void __launch_bounds__(kScanThreads)
    scan_kernel(int64_t* __restrict__ work, int64_t units, int64_t E, int64_t* __restrict__ totals) {
  const int64_t e = blockIdx.x;
  const int64_t total = block_exclusive_scan(work + e, work + e, units, E);
  if (threadIdx.x == 0) totals[e] = total;
}

// dropless: expert e's packed rows start after all earlier experts' assignments (one block)
__global__ void __launch_bounds__(kScanThreads)
    start_kernel(const int64_t* __restrict__ totals, int64_t E, int64_t* __restrict__ start) {
  block_exclusive_scan(totals, start, E, 1);
}

__global__ void position_kernel(const int64_t* __restrict__ idx, const int64_t* __restrict__ base,
                                const int64_t* __restrict__ start, int64_t N, int64_t E, int64_t k, int64_t nb,
                                int64_t cap, int64_t S, int64_t* __restrict__ pos, int64_t* __restrict__ slot,
                                int64_t* __restrict__ tos) {
  __shared__ int64_t sh_e[kRouteBlock];
  const int64_t b = blockIdx.x, j = blockIdx.y;
  const int64_t n = b * kRouteBlock + threadIdx.x;
  const int64_t e = n < N ? idx[n * k + j] : -1;
  sh_e[threadIdx.x] = e;
  __syncthreads();
  if (n >= N) return;
  int64_t before = 0;  // same-expert assignments earlier in this block
  for (int i = 0; i < static_cast<int>(threadIdx.x); ++i) before += (sh_e[i] == e);
  const int64_t p = base[(j * nb + b) * E + e] + before;
  const int64_t s = cap < 0 ? start[e] + p : (p < cap ? e * cap + p : -1);
  pos[n * k + j] = p;
  slot[n * k + j] = s;
  if (s >= 0 && s < S) tos[s] = n;
}

// The row kernels move VEC elements per thread and access: 16 bytes (VEC = 16 / sizeof(T)) when every row they
// touch starts 16-byte aligned and C is a multiple of VEC (row_vec decides), else 1. A 2-byte load per thread
// leaves most of a 128-byte transaction's width unused; these kernels are pure bandwidth.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const float (&f)[VEC]) {
  Pack<T, VEC> out;
#pragma unroll
  for (int i = 0; i < VEC; ++i) out.v[i] = from_f<T>(f[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = out;
}

template <typename T, int VEC>
__global__ void dispatch_kernel(const T* __restrict__ x, int64_t N, int64_t C, int64_t sx,
                                const int64_t* __restrict__ tos, T* __restrict__ buf) {
  const int64_t s = blockIdx.x;
  const int64_t t = tos[s];
  T* dst = buf + s * C;
  const bool keep = t >= 0 && t < N;
  const T* src = x + (keep ? t : 0) * sx;
  for (int64_t c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
    if (keep) {
      *reinterpret_cast<Pack<T, VEC>*>(dst + c) = load_pack<T, VEC>(src + c);  // a copy: bit-exact
    } else {
      float zero[VEC] = {};
      store_pack<T, VEC>(dst + c, zero);
    }
  }
}

template <typename T, int VEC>
__global__ void dispatch_bwd_kernel(const T* __restrict__ g, int64_t S, int64_t C, int64_t sg,
                                    const int64_t* __restrict__ slot, int64_t k, T* __restrict__ gx) {
  const int64_t n = blockIdx.x;
  for (int64_t c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
    float acc[VEC] = {};
    for (int64_t j = 0; j < k; ++j) {
      const int64_t s = slot[n * k + j];
      if (s < 0 || s >= S) continue;
      const Pack<T, VEC> v = load_pack<T, VEC>(g + s * sg + c);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += to_f(v.v[i]);
    }
    store_pack<T, VEC>(gx + n * C + c, acc);
  }
}

template <typename T, int VEC>
__global__ void combine_kernel(const T* __restrict__ out, int64_t S, int64_t C, int64_t so,
                               const float* __restrict__ w, const int64_t* __restrict__ slot, int64_t k,
                               T* __restrict__ y) {
  const int64_t n = blockIdx.x;
  for (int64_t c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
    float acc[VEC] = {};
    for (int64_t j = 0; j < k; ++j) {
      const int64_t s = slot[n * k + j];
      if (s < 0 || s >= S) continue;
      const float wj = w[n * k + j];
      const Pack<T, VEC> v = load_pack<T, VEC>(out + s * so + c);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += wj * to_f(v.v[i]);
    }
    store_pack<T, VEC>(y + n * C + c, acc);
  }
}

template <typename T, int VEC>
__global__ void combine_bwd_out_kernel(const T* __restrict__ gy, int64_t sgy, int64_t C, const float* __restrict__ w,
                                       const int64_t* __restrict__ slot, const int64_t* __restrict__ tos, int64_t N,
                                       int64_t k, T* __restrict__ g_out) {
  const int64_t s = blockIdx.x;
  const int64_t t = tos[s];
  float wt = 0.f;
  bool found = false;
  if (t >= 0 && t < N)
    for (int64_t j = 0; j < k; ++j)
      if (slot[t * k + j] == s) { wt = w[t * k + j]; found = true; }
  T* dst = g_out + s * C;
  for (int64_t c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
    float f[VEC] = {};
    if (found) {
      const Pack<T, VEC> v = load_pack<T, VEC>(gy + t * sgy + c);
#pragma unroll
      for (int i = 0; i < VEC; ++i) f[i] = wt * to_f(v.v[i]);
    }
    store_pack<T, VEC>(dst + c, f);
  }
}

template <typename T>
__global__ void combine_bwd_w_kernel(const T* __restrict__ gy, int64_t sgy, const T* __restrict__ out, int64_t so,
                                     int64_t S, int64_t C, const int64_t* __restrict__ slot, int64_t k,
                                     float* __restrict__ g_w) {
  __shared__ float red[256];
  const int64_t n = blockIdx.x;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t s = slot[n * k + j];
    float part = 0.f;
    if (s >= 0 && s < S)
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) part += to_f(gy[n * sgy + c]) * to_f(out[s * so + c]);
    red[threadIdx.x] = part;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half >>= 1) {
      if (threadIdx.x < half) red[threadIdx.x] += red[threadIdx.x + half];
      __syncthreads();
    }
    if (threadIdx.x == 0) g_w[n * k + j] = red[0];
    __syncthreads();
  }
}

template <typename F>
void by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(float{}); break;
    case 1: f(__half{}); break;
    case 2: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("moe cuda kernels take float32, float16 or bfloat16 values");
  }
}

}  // namespace

void route(const float* probs, int64_t N, int64_t E, int64_t stride_n, int64_t stride_e, int64_t k, int64_t cap,
           int64_t* expert_idx, int64_t* position, int64_t* slot, int64_t* token_of_slot, int64_t num_slots,
           int64_t* tokens_per_expert, int64_t* work, int device, uintptr_t stream) {
  apt::cuda::DeviceGuard guard(device);
  cudaStream_t st = apt::cuda::as_stream(stream);
  if (num_slots > 0)
    APT_CUDA_CHECK(cudaMemsetAsync(token_of_slot, 0xff, num_slots * sizeof(int64_t), st));  // all bits set = -1
  if (N == 0) {
    APT_CUDA_CHECK(cudaMemsetAsync(tokens_per_expert, 0, E * sizeof(int64_t), st));
    return;
  }
  const int64_t nb = (N + kRouteBlock - 1) / kRouteBlock, units = k * nb;
  int64_t* start = work + units * E;
  const dim3 grid = blocks_for(N, 128);
  const int kk = static_cast<int>(k);
  if (k <= 1)
    topk_kernel<1><<<grid, 128, 0, st>>>(probs, N, E, stride_n, stride_e, kk, expert_idx);
  else if (k <= 2)
    topk_kernel<2><<<grid, 128, 0, st>>>(probs, N, E, stride_n, stride_e, kk, expert_idx);
  else if (k <= 4)
    topk_kernel<4><<<grid, 128, 0, st>>>(probs, N, E, stride_n, stride_e, kk, expert_idx);
  else if (k <= 8)
    topk_kernel<8><<<grid, 128, 0, st>>>(probs, N, E, stride_n, stride_e, kk, expert_idx);
  else
    topk_kernel<kMaxK><<<grid, 128, 0, st>>>(probs, N, E, stride_n, stride_e, kk, expert_idx);
  APT_CUDA_CHECK(cudaGetLastError());
  count_kernel<<<dim3(static_cast<unsigned>(nb), static_cast<unsigned>(k)), kRouteBlock, E * sizeof(int), st>>>(
      expert_idx, N, E, k, nb, work);
  APT_CUDA_CHECK(cudaGetLastError());
  scan_kernel<<<static_cast<unsigned>(E), kScanThreads, 0, st>>>(work, units, E, tokens_per_expert);
  APT_CUDA_CHECK(cudaGetLastError());
  start_kernel<<<1, kScanThreads, 0, st>>>(tokens_per_expert, E, start);
  APT_CUDA_CHECK(cudaGetLastError());
  position_kernel<<<dim3(static_cast<unsigned>(nb), static_cast<unsigned>(k)), kRouteBlock, 0, st>>>(
      expert_idx, work, start, N, E, k, nb, cap, num_slots, position, slot, token_of_slot);
  APT_CUDA_CHECK(cudaGetLastError());
}

void dispatch(int dtype, const void* x, int64_t N, int64_t C, int64_t stride_x, const int64_t* token_of_slot,
              int64_t S, void* buf, int device, uintptr_t stream) {
  if (S == 0 || C == 0) return;
  apt::cuda::DeviceGuard guard(device);
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    by_vec<T>(row_vec<T>(C, {x, buf}, {stride_x}), [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      dispatch_kernel<T, V><<<static_cast<unsigned>(S), row_threads(C / V), 0, apt::cuda::as_stream(stream)>>>(
          static_cast<const T*>(x), N, C, stride_x, token_of_slot, static_cast<T*>(buf));
    });
  });
  APT_CUDA_CHECK(cudaGetLastError());
}

void dispatch_backward(int dtype, const void* grad_buf, int64_t S, int64_t C, int64_t stride_g, const int64_t* slot,
                       int64_t N, int64_t k, void* grad_x, int device, uintptr_t stream) {
  if (N == 0 || C == 0) return;
  apt::cuda::DeviceGuard guard(device);
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    by_vec<T>(row_vec<T>(C, {grad_buf, grad_x}, {stride_g}), [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      dispatch_bwd_kernel<T, V><<<static_cast<unsigned>(N), row_threads(C / V), 0, apt::cuda::as_stream(stream)>>>(
          static_cast<const T*>(grad_buf), S, C, stride_g, slot, k, static_cast<T*>(grad_x));
    });
  });
  APT_CUDA_CHECK(cudaGetLastError());
}

void combine(int dtype, const void* out, int64_t S, int64_t C, int64_t stride_o, const float* weights,
             const int64_t* slot, int64_t N, int64_t k, void* y, int device, uintptr_t stream) {
  if (N == 0 || C == 0) return;
  apt::cuda::DeviceGuard guard(device);
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    by_vec<T>(row_vec<T>(C, {out, y}, {stride_o}), [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      combine_kernel<T, V><<<static_cast<unsigned>(N), row_threads(C / V), 0, apt::cuda::as_stream(stream)>>>(
          static_cast<const T*>(out), S, C, stride_o, weights, slot, k, static_cast<T*>(y));
    });
  });
  APT_CUDA_CHECK(cudaGetLastError());
}

void combine_backward(int dtype, const void* grad_y, int64_t stride_gy, const void* out, int64_t stride_o, int64_t S,
                      int64_t C, const float* weights, const int64_t* slot, const int64_t* token_of_slot, int64_t N,
                      int64_t k, void* grad_out, float* grad_weights, int device, uintptr_t stream) {
  apt::cuda::DeviceGuard guard(device);
  cudaStream_t st = apt::cuda::as_stream(stream);
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (S > 0 && C > 0) {
      by_vec<T>(row_vec<T>(C, {grad_y, grad_out}, {stride_gy}), [&](auto vec) {
        constexpr int V = decltype(vec)::value;
        combine_bwd_out_kernel<T, V><<<static_cast<unsigned>(S), row_threads(C / V), 0, st>>>(
            static_cast<const T*>(grad_y), stride_gy, C, weights, slot, token_of_slot, N, k,
            static_cast<T*>(grad_out));
      });
      APT_CUDA_CHECK(cudaGetLastError());
    }
    if (N > 0) {
      combine_bwd_w_kernel<T><<<static_cast<unsigned>(N), 256, 0, st>>>(
          static_cast<const T*>(grad_y), stride_gy, static_cast<const T*>(out), stride_o, S, C, slot, k,
          grad_weights);
      APT_CUDA_CHECK(cudaGetLastError());
    }
  });
}

}  // namespace moe_cuda
}  // namespace apt
