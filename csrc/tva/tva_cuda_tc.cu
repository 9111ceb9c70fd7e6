// Fused TVA attention for fp16/bf16 on tensor cores (mma.sync m16n8k16, fp32 accumulation; sm_80+), FlashAttention-2
// style, with the contract of tva_cuda.cu's fp32 kernels (masks, padding, Tq != Tk, any strides, head dims 32/64/128,
// the perturbation coef·gate·delta added before the single write of o, LSE saved).
//
// Every block is 4 warps; each warp owns 16 rows of the block's tile and keeps its operands and accumulators in
// mma fragments (layouts: common/apt_mma.cuh), so softmax statistics live in registers: a row's values are spread
// over the 4 lanes of a quad, reduced with two shuffles.
//   forward: 64 query rows per block, Q fragments loaded once, 64-key K/V tiles in shared memory;
//            S = Q·Kᵀ, online softmax, P rounded to the input dtype (as FlashAttention does) and O += P·V.
//   dQ:      64 query rows, 32-key tiles: S, dP = dO·Vᵀ, dS = P∘(dP − Di), dQ += dS·K.
//   dK/dV:   64 keys per block, query tiles of 32 (16 at D = 128, for registers; 52 KB of dynamic shared memory):
//            Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ, dV += Pᵀ·dO, dK += dSᵀ·Q.
// Tiles are stored in shared memory as 16-bit patterns, rows padded by 16 bytes so that ldmatrix's row reads fall in
// distinct banks, rows past the sequence zero-filled (a masked probability is 0, but 0·NaN from stale memory would
// not be). Tiles of tensors with unit head-dim stride and 16-byte aligned rows load in 16-byte vectors, by cp.async
// in the loops so that the next tile's load overlaps the math: the forward loads V(j) during S = Q·K(j)ᵀ and
// K(j + 1) during O += P·V(j) (one buffer each); dQ and dK/dV keep two stages of their streamed tiles. Other layouts
// load element by element, synchronously.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "common/apt_mma.cuh"
#include "tva/tva_cuda_impl.cuh"

namespace apt {
namespace tva {
namespace {

using cuda::bits16;
using cuda::from_f;
using cuda::mma_16816;
using cuda::pack2;
using cuda::to_f;

constexpr int kThreads = 128;  // 4 warps
constexpr int kPad = 8;        // elements of padding per shared-memory row
constexpr int kBlockRows = 64;  // query rows (forward, dQ) or keys (dK/dV) per block
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

// which tiles may be loaded in 16-byte vectors (a bit per tensor)
enum VecBits : int { kVecQ = 1, kVecK = 2, kVecV = 4, kVecGo = 8 };

struct alignas(16) Pack16 {
  uint32_t w[4];
};

// rows [r0, r0 + ROWS) of a (B, H, T, D) tensor -> shared memory as 16-bit patterns, zeros past T_. ASYNC: the
// 16-byte vectors go by cp.async (the caller commits, waits and syncs); the scalar path is always synchronous.
template <typename T, int D, int ROWS, bool ASYNC = false>
__device__ void load_rows(const void* src, const int64_t* s, int64_t b, int64_t h, int64_t r0, int64_t T_,
                          uint16_t (*dst)[D + kPad], bool vec) {
  const T* x = static_cast<const T*>(src);
  if (vec) {
    constexpr int V = D / 8;
    for (int idx = threadIdx.x; idx < ROWS * V; idx += blockDim.x) {
      const int r = idx / V, c = (idx % V) * 8;
      const int64_t t = r0 + r;
      if (t >= T_) *reinterpret_cast<Pack16*>(&dst[r][c]) = Pack16{{0u, 0u, 0u, 0u}};
      else if (ASYNC) cuda::cp_async16(&dst[r][c], x + off4(s, b, h, t, c));
      else *reinterpret_cast<Pack16*>(&dst[r][c]) = *reinterpret_cast<const Pack16*>(x + off4(s, b, h, t, c));
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * D; idx += blockDim.x) {
      const int r = idx / D, d = idx % D;
      const int64_t t = r0 + r;
      dst[r][d] = t < T_ ? static_cast<uint16_t>(bits16(x[off4(s, b, h, t, d)])) : uint16_t(0);
    }
  }
}

// The fragment loads below are ldmatrix.x4 (layouts: common/apt_mma.cuh), lane l addressing row l % 8 of matrix
// l / 8; with the 16-byte row padding the 8 rows of a matrix fall in distinct banks.

// the A fragments (rows r .. r + 15, all D columns) of a row-major tile
template <int D>
__device__ __forceinline__ void load_a(const uint16_t (*tile)[D + kPad], int r, int lane, uint32_t (&a)[D / 16][4]) {
  // matrices: (rows r, cols k0), (r + 8, k0), (r, k0 + 8), (r + 8, k0 + 8) = a[0..3]
  const uint16_t* base = &tile[r + (lane % 8) + 8 * ((lane / 8) % 2)][8 * (lane / 16)];
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) cuda::ldsm_x4(a[ks], base + 16 * ks);
}

// the A fragment of k step kk from C fragments c[2kk], c[2kk + 1] (16 rows × 16 columns), rounded to T
template <typename T, int NT>
__device__ __forceinline__ void c_to_a(const float (&c)[NT][4], int kk, uint32_t (&a)[4]) {
  a[0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// acc[nt] += A · tileᵀ over the tile's first 8·NT rows (B[k][n] = tile[n][k]), two 8-row slices per ldmatrix
template <typename T, int D, int NT>
__device__ __forceinline__ void mma_abt(const uint32_t (&a)[D / 16][4], const uint16_t (*tile)[D + kPad], int lane,
                                        float (&acc)[NT][4]) {
  static_assert(NT % 2 == 0, "8-row slices go in pairs");
  // matrices: (rows n0, cols k0), (n0, k0 + 8) = slice nt's b; (n0 + 8, k0), (n0 + 8, k0 + 8) = slice nt + 1's
  const uint16_t* base = &tile[(lane % 8) + 8 * (lane / 16)][8 * ((lane / 8) % 2)];
#pragma unroll
  for (int nt = 0; nt < NT; nt += 2) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t r[4];
      cuda::ldsm_x4(r, base + nt * 8 * (D + kPad) + 16 * ks);
      const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
      mma_16816<T>(acc[nt], a[ks], b0);
      mma_16816<T>(acc[nt + 1], a[ks], b1);
    }
  }
}

// acc[nd] += A · tile[k0 : k0 + 16, :] (B[k][n] = tile[k0 + k][n]), two 8-column slices per transposing ldmatrix
template <typename T, int D>
__device__ __forceinline__ void mma_ab(const uint32_t (&a)[4], const uint16_t (*tile)[D + kPad], int k0, int lane,
                                       float (&acc)[D / 8][4]) {
  // matrices: (rows k0, cols n0), (k0 + 8, n0) = slice nd's b; (k0, n0 + 8), (k0 + 8, n0 + 8) = slice nd + 1's
  const uint16_t* base = &tile[k0 + (lane % 8) + 8 * ((lane / 8) % 2)][8 * (lane / 16)];
#pragma unroll
  for (int nd = 0; nd < D / 8; nd += 2) {
    uint32_t r[4];
    cuda::ldsm_x4_trans(r, base + nd * 8);
    const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
    mma_16816<T>(acc[nd], a, b0);
    mma_16816<T>(acc[nd + 1], a, b1);
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <int D>
struct alignas(16) FwdSmem {
  uint16_t k[64][D + kPad];  // Q first (its fragments go to registers), then each K tile
  uint16_t v[64][D + kPad];
  bool kok[64];  // key j of the current K tile usable (in range, not padding); written with K
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) tva_fwd_tc_kernel(const CudaParams p, const int vec) {
  constexpr int BM = kBlockRows, BN = 64, NT = BN / 8, ND = D / 8;
  using Smem = FwdSmem<D>;
  __shared__ Smem sm;
  const BlockRows blk = block_rows(p, p.Tq, BM);
  const int64_t bh = blk.bh, b = blk.b, h = blk.h, m0 = blk.r0;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int wr = (threadIdx.x / 32) * 16 + g;  // this lane's rows of the tile: wr and wr + 8
  const int64_t row[2] = {m0 + wr, m0 + wr + 8};
  const int64_t off = p.Tk - p.Tq;
  const MaskSpec ms = mask_of(p);
  const float scale2 = p.scale * kLog2e;  // scores in log2 units: exp2 is one instruction

  load_rows<T, D, BM>(p.q, p.sq, b, h, m0, p.Tq, sm.k, vec & kVecQ);
  __syncthreads();
  uint32_t qa[D / 16][4];
  load_a<D>(sm.k, wr - g, lane, qa);

  float acc[ND][4];
#pragma unroll
  for (int nd = 0; nd < ND; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // l: this lane's part of the row sum
  const KeyBlocks kb = key_blocks(ms, m0, BM, BN);
  // Pipeline (FlashAttention-2's): V(it) loads while S = Q·K(it)ᵀ and the softmax run, K(it + 1) while O += P·V(it).
  // One K and one V buffer; the two barriers per tile separate each buffer's readers from its next writer.
  const auto issue_k = [&](int64_t it) {
    const int64_t n0 = kb.start(it, BN);
    load_rows<T, D, BN, true>(p.k, p.sk, b, h, n0, p.Tk, sm.k, vec & kVecK);
    for (int j = threadIdx.x; j < BN; j += blockDim.x) sm.kok[j] = key_ok(p, b, n0 + j);
    cuda::cp_async_commit();
  };
  if (kb.count() > 0) {
    __syncthreads();  // every warp has its Q fragments: sm.k is free
    issue_k(0);
  }
  for (int64_t it = 0; it < kb.count(); ++it) {
    const int64_t n0 = kb.start(it, BN);
    cuda::cp_async_wait<0>();
    __syncthreads();  // K(it) has landed; every warp is done with V(it - 1)
    load_rows<T, D, BN, true>(p.v, p.sv, b, h, n0, p.Tk, sm.v, vec & kVecV);
    cuda::cp_async_commit();
    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    mma_abt<T, D, NT>(qa, sm.k, lane, s);
    float mx[2] = {m[0], m[1]};
    const bool full = tile_unmasked(p, m0, m0 + BM, n0, n0 + BN);  // block-uniform: no divergence
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, j = nt * 8 + 2 * t + (e & 1);
        const bool ok = full || (row[r] < p.Tq && sm.kok[j] && visible(ms, row[r] + off, n0 + j));
        s[nt][e] = ok ? s[nt][e] * scale2 : -INFINITY;
        mx[r] = fmaxf(mx[r], s[nt][e]);
      }
    }
    float msafe[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = quad_max(mx[r]);
      // a row with no visible key so far keeps m = -inf: subtract 0 so exp gives 0, never NaN
      msafe[r] = mx[r] == -INFINITY ? 0.f : mx[r];
      const float alpha = exp2f(m[r] - msafe[r]);
      l[r] *= alpha;
#pragma unroll
      for (int nd = 0; nd < ND; ++nd) {
        acc[nd][2 * r] *= alpha;
        acc[nd][2 * r + 1] *= alpha;
      }
      m[r] = mx[r];
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - msafe[e >> 1]);
        l[e >> 1] += s[nt][e];
      }
    }
    cuda::cp_async_wait<0>();
    __syncthreads();  // V(it) has landed; every warp is done with K(it)
    if (it + 1 < kb.count()) issue_k(it + 1);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[4];
      c_to_a<T, NT>(s, kk, pa);
      mma_ab<T, D>(pa, sm.v, 16 * kk, lane, acc);
    }
  }
  l[0] = quad_sum(l[0]);
  l[1] = quad_sum(l[1]);
  T* o = static_cast<T*>(p.o);
  T* at = static_cast<T*>(p.attn);
  const T* dl = static_cast<const T*>(p.delta);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = row[r];
    if (i >= p.Tq) continue;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    const float cg = coef_gate<T>(p, b, h, i);
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int d = nd * 8 + 2 * t + c;
        float val = acc[nd][2 * r + c] * inv;
        if (at != nullptr) at[off4(p.sa, b, h, i, d)] = from_f<T>(val);
        if (dl != nullptr) val += cg * to_f(dl[off4(p.sdl, b, h, i, d)]);
        o[off4(p.so, b, h, i, d)] = from_f<T>(val);
      }
    }
    if (t == 0) p.lse[bh * p.Tq + i] = l[r] > 0.f ? (m[r] + log2f(l[r])) * kLn2 : INFINITY;
  }
}

template <int D>
struct alignas(16) DqSmem {
  // two stages of a K tile (rows 0..31) and its V tile (32..63); Q and dO pass through stage 0 first on their way
  // to registers
  uint16_t kv[2][64][D + kPad];
  bool kok[2][32];
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) tva_bwd_dq_tc_kernel(const CudaParams p, const float* di, const int vec) {
  constexpr int BM = kBlockRows, BN = 32, NT = BN / 8, ND = D / 8;
  using Smem = DqSmem<D>;
  __shared__ Smem sm;
  const BlockRows blk = block_rows(p, p.Tq, BM);
  const int64_t bh = blk.bh, b = blk.b, h = blk.h, m0 = blk.r0;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int wr = (threadIdx.x / 32) * 16 + g;
  const int64_t row[2] = {m0 + wr, m0 + wr + 8};
  const int64_t off = p.Tk - p.Tq;
  const MaskSpec ms = mask_of(p);
  const float scale2 = p.scale * kLog2e;  // scores in log2 units: exp2 is one instruction

  uint32_t qa[D / 16][4], ga[D / 16][4];
  load_rows<T, D, BM>(p.q, p.sq, b, h, m0, p.Tq, sm.kv[0], vec & kVecQ);
  load_rows<T, D, BM>(p.go, p.sgo, b, h, m0, p.Tq, sm.kv[1], vec & kVecGo);
  __syncthreads();
  load_a<D>(sm.kv[0], wr - g, lane, qa);
  load_a<D>(sm.kv[1], wr - g, lane, ga);
  float lse[2], dii[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lse[r] = row[r] < p.Tq ? p.lse[bh * p.Tq + row[r]] * kLog2e : INFINITY;  // log2 units, as the scores
    dii[r] = row[r] < p.Tq ? di[bh * p.Tq + row[r]] : 0.f;
  }
  float dq[ND][4];
#pragma unroll
  for (int nd = 0; nd < ND; ++nd) dq[nd][0] = dq[nd][1] = dq[nd][2] = dq[nd][3] = 0.f;
  const KeyBlocks kb = key_blocks(ms, m0, BM, BN);
  // Two stages: tile it + 1 loads (cp.async) while tile it is computed on.
  const auto issue = [&](int64_t it) {
    const int64_t n0 = kb.start(it, BN);
    auto* st = sm.kv[it % 2];
    load_rows<T, D, BN, true>(p.k, p.sk, b, h, n0, p.Tk, st, vec & kVecK);
    load_rows<T, D, BN, true>(p.v, p.sv, b, h, n0, p.Tk, st + BN, vec & kVecV);
    for (int j = threadIdx.x; j < BN; j += blockDim.x) sm.kok[it % 2][j] = key_ok(p, b, n0 + j);
    cuda::cp_async_commit();
  };
  if (kb.count() > 0) {
    __syncthreads();  // every warp has its Q and dO fragments: both stages are free
    issue(0);
  }
  for (int64_t it = 0; it < kb.count(); ++it) {
    const int64_t n0 = kb.start(it, BN);
    if (it + 1 < kb.count()) {
      issue(it + 1);  // its stage was last read in iteration it - 1, before that iteration's closing barrier
      cuda::cp_async_wait<1>();
    } else {
      cuda::cp_async_wait<0>();
    }
    __syncthreads();  // tile it has landed
    const auto* st = sm.kv[it % 2];
    const bool* kok = sm.kok[it % 2];
    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
    mma_abt<T, D, NT>(qa, st, lane, s);
    mma_abt<T, D, NT>(ga, st + BN, lane, dp);
    const bool full = tile_unmasked(p, m0, m0 + BM, n0, n0 + BN);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, j = nt * 8 + 2 * t + (e & 1);
        const bool ok = full || (row[r] < p.Tq && kok[j] && visible(ms, row[r] + off, n0 + j));
        s[nt][e] = ok ? exp2f(s[nt][e] * scale2 - lse[r]) * (dp[nt][e] - dii[r]) : 0.f;  // dS
      }
    }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t da[4];
      c_to_a<T, NT>(s, kk, da);
      mma_ab<T, D>(da, st, 16 * kk, lane, dq);
    }
    __syncthreads();  // every warp is done with this stage before iteration it + 1 refills it
  }
  T* dqp = static_cast<T*>(p.dq);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= p.Tq) continue;
#pragma unroll
    for (int nd = 0; nd < ND; ++nd)
#pragma unroll
      for (int c = 0; c < 2; ++c)
        dqp[off4(p.sdq, b, h, row[r], nd * 8 + 2 * t + c)] = from_f<T>(dq[nd][2 * r + c] * p.scale);
  }
}

template <int D>
constexpr int dkdv_query_tile() {
  return D == 128 ? 16 : 32;
}

template <int D>
struct alignas(16) DkvSmem {
  static constexpr int BQ = dkdv_query_tile<D>();
  uint16_t k[64][D + kPad];
  uint16_t v[64][D + kPad];
  struct alignas(16) Stage {  // one query tile; two stages: the next loads while this one is computed on
    uint16_t q[BQ][D + kPad];
    uint16_t go[BQ][D + kPad];
    float lse[BQ], di[BQ];
  } st[2];
};

// dynamic shared memory (52 KB at D = 128: past the 48 KB a static declaration may have)
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) tva_bwd_dkdv_tc_kernel(const CudaParams p, const float* di, const int vec) {
  constexpr int BN = kBlockRows, BQ = dkdv_query_tile<D>(), NT = BQ / 8, ND = D / 8;
  using Smem = DkvSmem<D>;
  APT_DYNAMIC_SMEM(Pack16, smem_raw);
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const BlockRows blk = block_rows(p, p.Tk, BN);  // key blocks
  const int64_t bh = blk.bh, b = blk.b, h = blk.h, n0 = blk.r0;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int kr = (threadIdx.x / 32) * 16 + g;  // this lane's keys of the block: kr and kr + 8
  const int64_t key[2] = {n0 + kr, n0 + kr + 8};
  const bool kok[2] = {key_ok(p, b, key[0]), key_ok(p, b, key[1])};
  const int64_t off = p.Tk - p.Tq;
  const MaskSpec ms = mask_of(p);
  const float scale2 = p.scale * kLog2e;  // scores in log2 units: exp2 is one instruction

  float dk[ND][4], dv[ND][4];
#pragma unroll
  for (int nd = 0; nd < ND; ++nd)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nd][e] = dv[nd][e] = 0.f;
  int64_t i_lo, i_hi;
  query_range(ms, n0, BN, &i_lo, &i_hi);
  const int64_t m_first = (i_lo / BQ) * BQ, tiles = i_hi > m_first ? cdiv(i_hi - m_first, BQ) : 0;
  const auto issue = [&](int64_t j) {
    const int64_t m0 = m_first + j * BQ;
    auto& st = sm.st[j % 2];
    load_rows<T, D, BQ, true>(p.q, p.sq, b, h, m0, p.Tq, st.q, vec & kVecQ);
    load_rows<T, D, BQ, true>(p.go, p.sgo, b, h, m0, p.Tq, st.go, vec & kVecGo);
    for (int r = threadIdx.x; r < BQ; r += blockDim.x) {
      const int64_t i = m0 + r;
      st.lse[r] = i < p.Tq ? p.lse[bh * p.Tq + i] * kLog2e : INFINITY;  // log2 units, as the scores
      st.di[r] = i < p.Tq ? di[bh * p.Tq + i] : 0.f;
    }
    cuda::cp_async_commit();
  };
  if (tiles > 0) {  // K and V travel with the first query tile's group; never overwritten
    load_rows<T, D, BN, true>(p.k, p.sk, b, h, n0, p.Tk, sm.k, vec & kVecK);
    load_rows<T, D, BN, true>(p.v, p.sv, b, h, n0, p.Tk, sm.v, vec & kVecV);
    issue(0);
  }
  for (int64_t j = 0; j < tiles; ++j) {
    const int64_t m0 = m_first + j * BQ;
    if (j + 1 < tiles) {
      issue(j + 1);  // its stage was last read in iteration j - 1, before that iteration's closing barrier
      cuda::cp_async_wait<1>();
    } else {
      cuda::cp_async_wait<0>();
    }
    __syncthreads();  // query tile j (and, first time, K and V) has landed
    const auto& st = sm.st[j % 2];
    const bool full = tile_unmasked(p, m0, m0 + BQ, n0, n0 + BN);
    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
    {
      uint32_t ka[D / 16][4];
      load_a<D>(sm.k, kr - g, lane, ka);
      mma_abt<T, D, NT>(ka, st.q, lane, s);  // Sᵀ = K·Qᵀ (unscaled)
      load_a<D>(sm.v, kr - g, lane, ka);
      mma_abt<T, D, NT>(ka, st.go, lane, dp);  // dPᵀ = V·dOᵀ
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, qi = nt * 8 + 2 * t + (e & 1);
        const int64_t i = m0 + qi;
        const bool ok = full || (kok[r] && i < p.Tq && visible(ms, i + off, key[r]));
        const float pr = ok ? exp2f(s[nt][e] * scale2 - st.lse[qi]) : 0.f;
        s[nt][e] = pr;
        dp[nt][e] = pr * (dp[nt][e] - st.di[qi]);  // dSᵀ
      }
    }
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      uint32_t a[4];
      c_to_a<T, NT>(s, kk, a);
      mma_ab<T, D>(a, st.go, 16 * kk, lane, dv);  // dV += Pᵀ·dO
      c_to_a<T, NT>(dp, kk, a);
      mma_ab<T, D>(a, st.q, 16 * kk, lane, dk);  // dK += dSᵀ·Q
    }
    __syncthreads();  // every warp is done with this stage before iteration j + 1 refills it
  }
  T* dkp = static_cast<T*>(p.dk);
  T* dvp = static_cast<T*>(p.dv);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (key[r] >= p.Tk) continue;
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int d = nd * 8 + 2 * t + c;
        dkp[off4(p.sdk, b, h, key[r], d)] = from_f<T>(dk[nd][2 * r + c] * p.scale);
        dvp[off4(p.sdv, b, h, key[r], d)] = from_f<T>(dv[nd][2 * r + c]);
      }
    }
  }
}

// A tensor's tiles load in 16-byte vectors when its head dim is contiguous and every row starts 16-byte aligned
// (the base and each stride of a dimension longer than 1 a multiple of 8 elements).
bool vec_ok(const void* ptr, const int64_t* s, const CudaParams& p, int64_t T_) {
  if (ptr == nullptr || s[3] != 1 || reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  const int64_t sizes[3] = {p.B, p.H, T_};
  for (int i = 0; i < 3; ++i)
    if (sizes[i] > 1 && s[i] % 8 != 0) return false;
  return true;
}

int vec_bits(const CudaParams& p, bool backward) {
  int v = 0;
  if (vec_ok(p.q, p.sq, p, p.Tq)) v |= kVecQ;
  if (vec_ok(p.k, p.sk, p, p.Tk)) v |= kVecK;
  if (vec_ok(p.v, p.sv, p, p.Tk)) v |= kVecV;
  if (backward && vec_ok(p.go, p.sgo, p, p.Tq)) v |= kVecGo;
  return v;
}

template <typename F>
void dispatch_tc(const CudaParams& p, F&& f) {
  const auto by_dim = [&](auto tag) { dispatch_head_dim(p.D, [&](auto dim) { f(tag, dim); }); };
  switch (p.dtype) {
    case 1: by_dim(__half{}); break;
    case 2: by_dim(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("q: the TVA tensor-core kernels take float16/bfloat16");
  }
}

}  // namespace

void tva_forward_cuda_tc(const CudaParams& p, cudaStream_t s) {
  const unsigned grid = grid_1d(p, cdiv(p.Tq, kBlockRows), kBlockRows);
  const int vec = vec_bits(p, false);
  dispatch_tc(p, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    tva_fwd_tc_kernel<T, D><<<grid, kThreads, 0, s>>>(p, vec);
  });
  APT_CUDA_CHECK(cudaGetLastError());
}

void tva_backward_cuda_tc(const CudaParams& p, cudaStream_t s, const float* di) {
  const unsigned gk = grid_1d(p, cdiv(p.Tk, kBlockRows), kBlockRows);
  const int vec = vec_bits(p, true);
  dispatch_tc(p, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    constexpr size_t bytes = sizeof(DkvSmem<D>);
    cuda::ensure_dynamic_smem(tva_bwd_dkdv_tc_kernel<T, D>, p.device, bytes,
                              [&] { return "tva backward (dK/dV) at head dim " + std::to_string(D); });
    tva_bwd_dkdv_tc_kernel<T, D><<<gk, kThreads, bytes, s>>>(p, di, vec);
    APT_CUDA_CHECK(cudaGetLastError());
    if (p.B * p.H * p.Tq > 0) {
      const unsigned gq = grid_1d(p, cdiv(p.Tq, kBlockRows), kBlockRows);
      tva_bwd_dq_tc_kernel<T, D><<<gq, kThreads, 0, s>>>(p, di, vec);
      APT_CUDA_CHECK(cudaGetLastError());
    }
  });
}

}  // namespace tva
}  // namespace apt
