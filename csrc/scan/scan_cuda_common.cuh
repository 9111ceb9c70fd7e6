// Device-side pieces shared by the selective-scan CUDA kernels (scan_cuda_fwd.cu, scan_cuda_bwd.cu).
// Thread layout: one thread per (channel, lane); a channel's N states are spread over NL lanes (NL = the next power of
// two >= N, at most 32) and NPT states per lane (n = lane + j * NL). A block holds CPB channels of one (batch, tile
// group), so every channel of a block shares its B and C rows. Time runs sequentially inside a block, one checkpoint
// chunk (<= 64 steps) at a time, with dt/u/... of the chunk staged in shared memory.
#pragma once
#include "common/apt_cuda.cuh"
#include "scan/scan_cuda.h"

#include <algorithm>
#include <type_traits>

namespace apt {
namespace scan_cuda {

using apt::cuda::from_f;
using apt::cuda::to_f;

constexpr int kSP = static_cast<int>(kMaxChunk) + 1;  // row pitch of the staged (channel, step) arrays (no bank clash)

// channels per block for NL lanes x NPT states per lane: at most 8, at most 128 states per block
__host__ __device__ constexpr int channels_per_block(int NL, int NPT) { return 128 / (NL * NPT) < 8 ? 128 / (NL * NPT) : 8; }

template <typename T> __device__ __forceinline__ float ld(const void* p, int64_t off) {
  return to_f<T>(static_cast<const T*>(p)[off]);
}
template <typename T> __device__ __forceinline__ void st(void* p, int64_t off, float v) {
  static_cast<T*>(p)[off] = from_f<T>(v);
}
__device__ __forceinline__ int64_t off3(const int64_t* s, int64_t b, int64_t d, int64_t t) {
  return b * s[0] + d * s[1] + t * s[2];
}
// torch's softplus (threshold 20) and its derivative
__device__ __forceinline__ float softplus_f(float x) { return x <= 20.f ? log1pf(__expf(x)) : x; }
__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + __expf(-x)); }

// Channels are tiled inside groups of dim / Gt channels, Gt = lcm(groups of B, groups of C), so a block never
// straddles a B or a C group. Block index = ((b * Gt + gt) * tiles + j).
struct Tiling {
  int64_t Gt = 1, dpt = 1, tiles = 1, blocks = 0;
};

inline int64_t gcd64(int64_t a, int64_t b) { return b == 0 ? a : gcd64(b, a % b); }
inline Tiling make_tiling(const ScanParams& p, int cpb) {
  Tiling t;
  const int64_t gb = p.gB > 0 ? p.gB : 1, gc = p.gC > 0 ? p.gC : 1;
  t.Gt = gb / gcd64(gb, gc) * gc;  // divides dim, since gb and gc do
  t.dpt = p.dim / t.Gt;
  t.tiles = (t.dpt + cpb - 1) / cpb;
  t.blocks = p.batch * t.Gt * t.tiles;
  return t;
}

// Where this thread's channel is. `active` is false for the padding slots of a block's last tile.
struct Slot {
  int64_t b, d, row, d0;  // d0: the block's first channel (its B/C group is the block's)
  bool active;
};
__device__ __forceinline__ Slot locate(const ScanParams& p, const Tiling& tl, int cpb, int cc) {
  Slot s;
  const int64_t blk = blockIdx.x;
  const int64_t j = blk % tl.tiles, rest = blk / tl.tiles;
  const int64_t gt = rest % tl.Gt;
  s.b = rest / tl.Gt;
  s.d0 = gt * tl.dpt + j * cpb;
  const int64_t dloc = j * cpb + cc;
  s.active = dloc < tl.dpt;
  s.d = s.active ? gt * tl.dpt + dloc : s.d0;  // a valid channel even in padding slots
  s.row = s.b * p.dim + s.d;
  return s;
}
// The chunks [begin, end) of time split `split` (ScanParams::chunks_per_split).
struct ChunkRange {
  int64_t begin, end;
};
__device__ __forceinline__ ChunkRange split_chunks(const ScanParams& p, int64_t nchunks, int64_t split) {
  const int64_t begin = split * p.chunks_per_split;
  return {begin, begin + p.chunks_per_split < nchunks ? begin + p.chunks_per_split : nchunks};
}

// Row of the packed (batch, G, L, N) B or C at t = 0 for this block, or null for a constant (dim, N) one.
__device__ __forceinline__ const float* var_row(const float* M, int64_t G, const ScanParams& p, const Slot& s) {
  if (G == 0) return nullptr;
  const int64_t g = s.d0 / (p.dim / G);
  return M + (s.b * G + g) * p.L * p.N;
}

// y[t] for NL consecutive steps, each lane holding its partial sums v[0..NL) (over its own states): after the
// butterfly, lane l of every aligned group of NL lanes returns the group's total for step l. NL - 1 shuffles for NL
// sums. Every lane of the warp must call it. Written as a template recursion over the offset O (NL/2, ..., 1) so that
// every index into v is a compile-time constant and v stays in registers.
template <int NL, int O>
struct Butterfly {
  static __device__ __forceinline__ void run(float (&v)[NL], int lane) {
    const bool upper = (lane & O) != 0;  // keeps the upper half of v[0..2O), sends the lower half
#pragma unroll
    for (int i = 0; i < O; ++i) {
      const float send = upper ? v[i] : v[i + O];
      const float keep = upper ? v[i + O] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
    }
    Butterfly<NL, O / 2>::run(v, lane);
  }
};
template <int NL>
struct Butterfly<NL, 0> {
  static __device__ __forceinline__ void run(float (&)[NL], int) {}
};
template <int NL>
__device__ __forceinline__ float reduce_scatter(float (&v)[NL], int lane) {
  Butterfly<NL, NL / 2>::run(v, lane);
  return v[0];
}
template <int NL>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = 1; o < NL; o *= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// This thread's states n = lane + j * NL: whether they exist (ok), A and the constant B/C (0 when packed).
template <int NL, int NPT>
__device__ __forceinline__ void load_channel(const ScanParams& p, const Slot& s, int lane, const float* Bv,
                                             const float* Cv, bool (&ok)[NPT], float (&A)[NPT], float (&Bc)[NPT],
                                             float (&Cc)[NPT]) {
#pragma unroll
  for (int j = 0; j < NPT; ++j) {
    const int64_t n = lane + j * NL, o = s.d * p.N + n;
    ok[j] = s.active && n < p.N;
    A[j] = ok[j] ? p.A[o] : 0.f;
    Bc[j] = ok[j] && !Bv ? p.B[o] : 0.f;
    Cc[j] = ok[j] && !Cv ? p.C[o] : 0.f;
  }
}

// B_t or C_t at state n: from the packed row Mv when there is one, else the constant Mc; 0 on padding lanes.
__device__ __forceinline__ float bc_at(const float* Mv, float Mc, bool ok, int64_t t, int64_t N, int64_t n) {
  return Mv ? (ok ? Mv[t * N + n] : 0.f) : Mc;
}

// The recurrence over the tile of steps k0 .. k0 + NL - 1 of a staged chunk (steps >= K skipped):
// h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t for this thread's NPT states, then on_state(i, j, t, h_t).
template <int NL, int NPT, typename F>
__device__ __forceinline__ void advance_tile(float (&h)[NPT], const float (&A)[NPT], const float (&Bc)[NPT],
                                             const bool (&ok)[NPT], const float* Bv, const float* dts,
                                             const float* us, int64_t t0, int k0, int K, int64_t N, int lane,
                                             F&& on_state) {
#pragma unroll
  for (int i = 0; i < NL; ++i) {
    const int k = k0 + i;
    if (k < K) {
      const int64_t t = t0 + k;
      const float dt = dts[k], dtu = dt * us[k];
#pragma unroll
      for (int j = 0; j < NPT; ++j) {
        h[j] = __expf(dt * A[j]) * h[j] + dtu * bc_at(Bv, Bc[j], ok[j], t, N, lane + j * NL);
        on_state(i, j, t, h[j]);
      }
    }
  }
}

// Per-chunk staging: for the block's channels and steps t0 <= t < t0 + K, dt (bias, softplus) and u; for the
// backward also dy (times silu(z) when z is given), the factor of dz (dy * dsilu(z), times y later) and d softplus.
// Padding channels get zeros, so they contribute nothing anywhere.
struct Stage {
  float (*dt)[kSP];
  float (*u)[kSP];
  float (*dy)[kSP];   // backward only
  float (*dzf)[kSP];  // backward only
  float (*dsp)[kSP];  // backward only
};
// kU = false leaves u unread (zeros): the backward's adjoint pre-pass needs only dt and dy.
template <typename T, bool kBwd, bool kU = true>
__device__ void load_stage(const ScanParams& p, const Tiling& tl, int cpb, int nthreads, int64_t t0, int K,
                           const Stage& sg) {
  const int64_t blk = blockIdx.x;
  const int64_t j = blk % tl.tiles, rest = blk / tl.tiles;
  const int64_t gt = rest % tl.Gt, b = rest / tl.Gt;
  for (int i = threadIdx.x; i < cpb * K; i += nthreads) {
    const int c = i / K, k = i % K;
    const int64_t dloc = j * cpb + c;
    float dt = 0.f, uu = 0.f, dy = 0.f, dzf = 0.f, dsp = 1.f;
    if (dloc < tl.dpt) {
      const int64_t d = gt * tl.dpt + dloc, t = t0 + k;
      const float raw = ld<T>(p.delta, off3(p.sdelta, b, d, t)) + (p.bias ? p.bias[d] : 0.f);
      dt = p.softplus ? softplus_f(raw) : raw;
      if (kU) uu = ld<T>(p.u, off3(p.su, b, d, t));
      if (kBwd) {
        if (p.softplus && raw <= 20.f) dsp = sigmoid_f(raw);
        dy = ld<T>(p.dout, off3(p.sdout, b, d, t));
        if (p.z) {
          const float zz = ld<T>(p.z, off3(p.sz, b, d, t)), sgz = sigmoid_f(zz);
          dzf = dy * sgz * (1.f + zz * (1.f - sgz));
          dy = dy * zz * sgz;
        }
      }
    }
    sg.dt[c][k] = dt;
    sg.u[c][k] = uu;
    if (kBwd) {
      sg.dy[c][k] = dy;
      sg.dzf[c][k] = dzf;
      sg.dsp[c][k] = dsp;
    }
  }
}

// ---------------------------------------------------------------- host-side dispatch
template <typename T> struct Tag { using type = T; };

template <typename F>
void dispatch_dtype(int code, F&& f) {
  switch (code) {
    case 0: f(Tag<float>{}); break;
    case 1: f(Tag<__half>{}); break;
    case 2: f(Tag<__nv_bfloat16>{}); break;
    default: throw std::invalid_argument("selective scan CUDA: unsupported dtype code " + std::to_string(code));
  }
}

// f(integral_constant<NL>, integral_constant<NPT>) for the lane layout of N states
template <typename F>
void dispatch_lanes(int64_t N, F&& f) {
  using std::integral_constant;
  if (N <= 4) f(integral_constant<int, 4>{}, integral_constant<int, 1>{});
  else if (N <= 8) f(integral_constant<int, 8>{}, integral_constant<int, 1>{});
  else if (N <= 16) f(integral_constant<int, 16>{}, integral_constant<int, 1>{});
  else if (N <= 32) f(integral_constant<int, 32>{}, integral_constant<int, 1>{});
  else if (N <= 64) f(integral_constant<int, 32>{}, integral_constant<int, 2>{});
  else if (N <= kMaxN) f(integral_constant<int, 32>{}, integral_constant<int, 4>{});
  else throw std::invalid_argument("selective scan CUDA: N=" + std::to_string(N) + " exceeds " + std::to_string(kMaxN));
}

using apt::cuda::DeviceGuard;

inline unsigned grid_x(int64_t blocks) {
  if (blocks > 0x7fffffffLL) throw std::invalid_argument("selective scan CUDA: too many channel blocks");
  return static_cast<unsigned>(blocks);
}

}  // namespace scan_cuda
}  // namespace apt
