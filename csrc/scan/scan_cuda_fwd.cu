// Selective scan forward (SCAN.md) and the one-step decode update, in CUDA. Forward: one thread per (channel, state
// lane) walks time, writing the state before every chunk (checkpoints (batch, dim, nchunks, N) fp32), y through a
// butterfly over the lanes (NL steps per NL - 1 shuffles) and the last state. Parallel over L too: with several
// splits, a first pass gives each split's end state from h = 0 and its sum of dt, the main pass starts each split
// from the combination of the earlier ones. Layouts and limits in scan_cuda.h (N <= 128, chunk <= 64).
#include "scan/scan_cuda_common.cuh"

namespace apt {
namespace scan_cuda {
namespace {

// kFinal = false: the first pass over splits 0 .. S-2 (end state from h = 0, sum of dt);
// kFinal = true: the main pass (checkpoints, y, last state), split s starting from the combined earlier ones.
template <typename T, int NL, int NPT, bool kFinal>
__global__ void __launch_bounds__(channels_per_block(NL, NPT) * NL)
    scan_fwd_kernel(const ScanParams p, const Tiling tl, const int64_t nchunks, const int64_t nsplits) {
  constexpr int CPB = channels_per_block(NL, NPT), NT = CPB * NL;
  __shared__ float s_dt[CPB][kSP];
  __shared__ float s_u[CPB][kSP];
  const Stage sg{s_dt, s_u, nullptr, nullptr, nullptr};
  const int tid = threadIdx.x, cc = tid / NL, lane = tid % NL;
  const Slot s = locate(p, tl, CPB, cc);
  const int64_t N = p.N, L = p.L, split = blockIdx.y;
  const ChunkRange cr = split_chunks(p, nchunks, split);
  const float* Bv = var_row(p.B, p.gB, p, s);
  const float* Cv = var_row(p.C, p.gC, p, s);

  bool ok[NPT];
  float A[NPT], Bc[NPT], Cc[NPT], h[NPT];
  load_channel<NL, NPT>(p, s, lane, Bv, Cv, ok, A, Bc, Cc);
#pragma unroll
  for (int j = 0; j < NPT; ++j) h[j] = 0.f;
  // seg_state (rows, nsplits - 1, N), seg_dt (rows, nsplits - 1)
  if (kFinal) {
    for (int64_t q = 0; q < split; ++q) {
      const int64_t w = s.row * (nsplits - 1) + q;
      const float sdt = s.active ? p.seg_dt[w] : 0.f;
#pragma unroll
      for (int j = 0; j < NPT; ++j)
        if (ok[j]) h[j] = __expf(A[j] * sdt) * h[j] + p.seg_state[w * N + lane + j * NL];
    }
  }
  float dt_sum = 0.f;
  for (int64_t c = cr.begin; c < cr.end; ++c) {
    const int64_t t0 = c * p.chunk;
    const int K = static_cast<int>(L - t0 < p.chunk ? L - t0 : p.chunk);
    if (kFinal) {
#pragma unroll
      for (int j = 0; j < NPT; ++j)
        if (ok[j]) p.ckpt[(s.row * nchunks + c) * N + lane + j * NL] = h[j];
    }
    __syncthreads();  // the previous chunk's staged values are no longer read
    load_stage<T, false>(p, tl, CPB, NT, t0, K, sg);
    __syncthreads();
    if (!kFinal) {
      for (int k = 0; k < K; ++k) dt_sum += s_dt[cc][k];
    }
    for (int k0 = 0; k0 < K; k0 += NL) {
      float acc[NL];
#pragma unroll
      for (int i = 0; i < NL; ++i) acc[i] = 0.f;
      advance_tile<NL, NPT>(h, A, Bc, ok, Bv, s_dt[cc], s_u[cc], t0, k0, K, N, lane,
                            [&](int i, int j, int64_t t, float hj) {
                              if (kFinal) acc[i] += hj * bc_at(Cv, Cc[j], ok[j], t, N, lane + j * NL);
                            });
      if (kFinal) {
        float y = reduce_scatter<NL>(acc, lane);  // this lane's step: k0 + lane
        const int k = k0 + lane;
        if (s.active && k < K) {
          const int64_t t = t0 + k;
          if (p.D) y += p.D[s.d] * s_u[cc][k];
          if (p.z) {
            const float zz = ld<T>(p.z, off3(p.sz, s.b, s.d, t));
            y *= zz * sigmoid_f(zz);
          }
          st<T>(p.out, off3(p.sout, s.b, s.d, t), y);
        }
      }
    }
  }
  if (kFinal) {
    if (split == nsplits - 1) {
#pragma unroll
      for (int j = 0; j < NPT; ++j)
        if (ok[j]) p.last[s.row * N + lane + j * NL] = h[j];
    }
  } else {
    const int64_t w = s.row * (nsplits - 1) + split;
#pragma unroll
    for (int j = 0; j < NPT; ++j)
      if (ok[j]) p.seg_state[w * N + lane + j * NL] = h[j];
    if (s.active && lane == 0) p.seg_dt[w] = dt_sum;
  }
}

// One thread per (row, lane); lanes = NL (power of two <= 32) per row, each looping over n = lane, lane + NL, ...
template <typename T, typename S>
__global__ void __launch_bounds__(128) state_update_kernel(const StepParams p, const int NL) {
  const int64_t gid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t row = gid / NL;
  const int lane = static_cast<int>(gid % NL);
  const bool active = row < p.batch * p.dim;
  const int64_t b = active ? row / p.dim : 0, d = active ? row % p.dim : 0, N = p.N;
  float y = 0.f, xx = 0.f;
  if (active) {
    float dt = ld<T>(p.dt, b * p.sdt[0] + d * p.sdt[1]) + (p.bias ? p.bias[d] : 0.f);
    if (p.softplus) dt = softplus_f(dt);
    xx = ld<T>(p.x, b * p.sx[0] + d * p.sx[1]);
    const float* Bt = p.B + (b * p.gB + d / (p.dim / p.gB)) * N;
    const float* Ct = p.C + (b * p.gC + d / (p.dim / p.gC)) * N;
    for (int64_t n = lane; n < N; n += NL) {
      const int64_t o = b * p.sstate[0] + d * p.sstate[1] + n * p.sstate[2];
      const float hn = __expf(dt * p.A[d * N + n]) * ld<S>(p.state, o) + dt * xx * Bt[n];
      st<S>(p.state, o, hn);
      y += hn * Ct[n];
    }
  }
  for (int o = NL / 2; o >= 1; o /= 2) y += __shfl_xor_sync(0xffffffffu, y, o);
  if (active && lane == 0) {
    if (p.D) y += p.D[d] * xx;
    if (p.z) {
      const float zz = ld<T>(p.z, b * p.sz[0] + d * p.sz[1]);
      y *= zz * sigmoid_f(zz);
    }
    st<T>(p.y, b * p.sy[0] + d * p.sy[1], y);
  }
}

}  // namespace

void selective_scan_fwd(const ScanParams& p, uintptr_t stream) {
  if (p.batch * p.dim == 0) return;
  if (p.L < 1 || p.chunk < 1 || p.chunk > kMaxChunk || p.chunks_per_split < 1)
    throw std::invalid_argument("selective_scan_fwd_cuda: bad L / chunk / chunks_per_split");
  DeviceGuard guard(p.device);
  const cudaStream_t st = apt::cuda::as_stream(stream);
  const int64_t nchunks = (p.L + p.chunk - 1) / p.chunk;
  const int64_t nsplits = (nchunks + p.chunks_per_split - 1) / p.chunks_per_split;
  if (nsplits > 65535) throw std::invalid_argument("selective_scan_fwd_cuda: more than 65535 splits");
  if (nsplits > 1 && (!p.seg_state || !p.seg_dt))
    throw std::invalid_argument("selective_scan_fwd_cuda: several splits need seg_state and seg_dt");
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_lanes(p.N, [&](auto nl, auto npt) {
      constexpr int NL = decltype(nl)::value, NPT = decltype(npt)::value;
      constexpr int CPB = channels_per_block(NL, NPT);
      const Tiling tl = make_tiling(p, CPB);
      const unsigned gx = grid_x(tl.blocks);
      if (nsplits > 1) {
        scan_fwd_kernel<T, NL, NPT, false><<<dim3(gx, static_cast<unsigned>(nsplits - 1)), CPB * NL, 0, st>>>(
            p, tl, nchunks, nsplits);
        APT_CUDA_CHECK(cudaGetLastError());
      }
      scan_fwd_kernel<T, NL, NPT, true><<<dim3(gx, static_cast<unsigned>(nsplits)), CPB * NL, 0, st>>>(
          p, tl, nchunks, nsplits);
      APT_CUDA_CHECK(cudaGetLastError());
    });
  });
}

void selective_state_update(const StepParams& p, uintptr_t stream) {
  const int64_t rows = p.batch * p.dim;
  if (rows == 0 || p.N == 0) return;
  DeviceGuard guard(p.device);
  int NL = 1;
  while (NL < p.N && NL < 32) NL *= 2;
  const int64_t blocks = (rows * NL + 127) / 128;
  const cudaStream_t st = apt::cuda::as_stream(stream);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_dtype(p.state_dtype, [&](auto stag) {
      using S = typename decltype(stag)::type;
      state_update_kernel<T, S><<<grid_x(blocks), 128, 0, st>>>(p, NL);
      APT_CUDA_CHECK(cudaGetLastError());
    });
  });
}

}  // namespace scan_cuda
}  // namespace apt
