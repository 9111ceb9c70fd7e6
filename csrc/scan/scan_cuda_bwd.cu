// Selective scan backward (SCAN.md) in CUDA: one thread per (channel, state lane) walks the chunks from last to first;
// per chunk it recomputes the states from the forward's checkpoint into shared memory, then walks the chunk backwards
// carrying the adjoint g of h (g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}). No (batch, dim, L, N) tensor is formed.
// Sums over channels/batch (dA, dD, dbias, constant dB/dC) are fp32 atomics at the end; a packed (batch, G, L, N) dB/dC
// is summed over the block's channels in shared memory per chunk, then added with one atomic per (block, t, n).
// Parallel over L too, as the forward: g is affine in the adjoint at a split's end (g_start = exp(A sum dt) g_end +
// g0, g0 the start adjoint from g_end = 0), so a light pre-pass (dt, dy and C only) gives every split but the first
// its g0 and sum of dt, and the main pass starts each split from dlast folded through the later ones.
// The caller zeroes dA, dB, dC, dD, dbias. Layouts and limits in scan_cuda.h (N <= 128, chunk <= 64).
#include "scan/scan_cuda_common.cuh"

namespace apt {
namespace scan_cuda {
namespace {

// The pre-pass over split s = blockIdx.y + 1: the adjoint at the split's start from a zero adjoint at its end into
// seg_state[(row, s - 1)], the split's sum of dt into seg_dt. Reads dt, dy (z) and C; no states, no u, no B.
template <typename T, int NL, int NPT>
__global__ void __launch_bounds__(channels_per_block(NL, NPT) * NL)
    scan_bwd_adjoint_kernel(const ScanParams p, const Tiling tl, const int64_t nchunks, const int64_t nsplits) {
  constexpr int CPB = channels_per_block(NL, NPT), NT = CPB * NL;
  __shared__ float s_dt[CPB][kSP];
  __shared__ float s_u[CPB][kSP];
  __shared__ float s_dy[CPB][kSP];
  __shared__ float s_dzf[CPB][kSP];
  __shared__ float s_dsp[CPB][kSP];
  const Stage sg{s_dt, s_u, s_dy, s_dzf, s_dsp};
  const int tid = threadIdx.x, cc = tid / NL, lane = tid % NL;
  const Slot s = locate(p, tl, CPB, cc);
  const int64_t N = p.N, L = p.L, split = static_cast<int64_t>(blockIdx.y) + 1;
  const ChunkRange cr = split_chunks(p, nchunks, split);
  const float* Bv = var_row(p.B, p.gB, p, s);
  const float* Cv = var_row(p.C, p.gC, p, s);

  bool ok[NPT];
  float A[NPT], Bc[NPT], Cc[NPT], g[NPT];
  load_channel<NL, NPT>(p, s, lane, Bv, Cv, ok, A, Bc, Cc);
#pragma unroll
  for (int j = 0; j < NPT; ++j) g[j] = 0.f;
  float dt_sum = 0.f;
  for (int64_t c = cr.end - 1; c >= cr.begin; --c) {
    const int64_t t0 = c * p.chunk;
    const int K = static_cast<int>(L - t0 < p.chunk ? L - t0 : p.chunk);
    __syncthreads();  // the previous chunk's staged values are no longer read
    load_stage<T, true, false>(p, tl, CPB, NT, t0, K, sg);
    __syncthreads();
#pragma unroll 4
    for (int k = K - 1; k >= 0; --k) {  // unrolled: the C loads and exps of later steps issue ahead of the g chain
      const int64_t t = t0 + k;
      const float dt = s_dt[cc][k], dy = s_dy[cc][k];
#pragma unroll
      for (int j = 0; j < NPT; ++j)
        g[j] = (g[j] + bc_at(Cv, Cc[j], ok[j], t, N, lane + j * NL) * dy) * __expf(dt * A[j]);
      dt_sum += dt;
    }
  }
  const int64_t w = s.row * (nsplits - 1) + (split - 1);
#pragma unroll
  for (int j = 0; j < NPT; ++j)
    if (ok[j]) p.seg_state[w * N + lane + j * NL] = g[j];
  if (s.active && lane == 0) p.seg_dt[w] = dt_sum;
}

// The main pass over split s = blockIdx.y (its chunks cr.begin .. cr.end - 1, last first).
template <typename T, int NL, int NPT>
__global__ void __launch_bounds__(channels_per_block(NL, NPT) * NL)
    scan_bwd_kernel(const ScanParams p, const Tiling tl, const int64_t nchunks, const int64_t nsplits) {
  constexpr int CPB = channels_per_block(NL, NPT), NT = CPB * NL;
  constexpr int NS = NT * NPT;   // states per block: one column of s_h per (lane slot, j)
  constexpr int NP = NL * NPT;   // padded N: row pitch of s_dB / s_dC
  __shared__ float s_dt[CPB][kSP];
  __shared__ float s_u[CPB][kSP];
  __shared__ float s_dy[CPB][kSP];
  __shared__ float s_dzf[CPB][kSP];
  __shared__ float s_dsp[CPB][kSP];
  APT_DYNAMIC_SMEM(float, s_dyn);
  const Stage sg{s_dt, s_u, s_dy, s_dzf, s_dsp};
  // s_h[k * NS + j * NT + tid]: state h_{t0 + k - 1} of (this thread, j), k = 0 .. chunk (k = 0: the checkpoint)
  float* s_h = s_dyn;
  float* s_dB = s_h + (p.chunk + 1) * NS;                  // (chunk, NP) when B is packed
  float* s_dC = s_dB + (p.gB ? p.chunk * NP : 0);          // (chunk, NP) when C is packed
  const int tid = threadIdx.x, cc = tid / NL, lane = tid % NL;
  const Slot s = locate(p, tl, CPB, cc);
  const int64_t N = p.N, L = p.L, split = blockIdx.y;
  const ChunkRange cr = split_chunks(p, nchunks, split);
  const float* Bv = var_row(p.B, p.gB, p, s);
  const float* Cv = var_row(p.C, p.gC, p, s);
  float* dBv = Bv ? p.dB + (Bv - p.B) : nullptr;
  float* dCv = Cv ? p.dC + (Cv - p.C) : nullptr;
  const float Dd = p.D && s.active ? p.D[s.d] : 0.f;

  bool ok[NPT];
  float A[NPT], Bc[NPT], Cc[NPT], g[NPT], dA[NPT], dBc[NPT], dCc[NPT];
  load_channel<NL, NPT>(p, s, lane, Bv, Cv, ok, A, Bc, Cc);
#pragma unroll
  for (int j = 0; j < NPT; ++j) {
    g[j] = ok[j] && p.dlast ? p.dlast[s.row * N + lane + j * NL] : 0.f;  // adjoint of h_{L-1}
    dA[j] = dBc[j] = dCc[j] = 0.f;
  }
  // the adjoint at this split's end: dlast carried through the later splits, last first
  for (int64_t q = nsplits - 1; q > split; --q) {
    const int64_t w = s.row * (nsplits - 1) + (q - 1);
    const float sdt = s.active ? p.seg_dt[w] : 0.f;
#pragma unroll
    for (int j = 0; j < NPT; ++j)
      if (ok[j]) g[j] = __expf(A[j] * sdt) * g[j] + p.seg_state[w * N + lane + j * NL];
  }
  float dD_acc = 0.f, dbias_acc = 0.f;  // this lane's steps (k = k0 + lane) of its channel

  for (int64_t c = cr.end - 1; c >= cr.begin; --c) {
    const int64_t t0 = c * p.chunk;
    const int K = static_cast<int>(L - t0 < p.chunk ? L - t0 : p.chunk);
    __syncthreads();  // the previous chunk's staged values and dB/dC sums are no longer read
    load_stage<T, true>(p, tl, CPB, NT, t0, K, sg);
    if (Bv) for (int i = tid; i < K * NP; i += NT) s_dB[i] = 0.f;
    if (Cv) for (int i = tid; i < K * NP; i += NT) s_dC[i] = 0.f;
    float h[NPT];
#pragma unroll
    for (int j = 0; j < NPT; ++j) {
      h[j] = ok[j] ? p.ckpt[(s.row * nchunks + c) * N + lane + j * NL] : 0.f;
      s_h[j * NT + tid] = h[j];
    }
    __syncthreads();

    // 1. recompute the chunk's states (each thread reads back only its own columns of s_h); y for dz
    for (int k0 = 0; k0 < K; k0 += NL) {
      float acc[NL];
#pragma unroll
      for (int i = 0; i < NL; ++i) acc[i] = 0.f;
      advance_tile<NL, NPT>(h, A, Bc, ok, Bv, s_dt[cc], s_u[cc], t0, k0, K, N, lane,
                            [&](int i, int j, int64_t t, float hj) {
                              s_h[(k0 + i + 1) * NS + j * NT + tid] = hj;
                              if (p.z) acc[i] += hj * bc_at(Cv, Cc[j], ok[j], t, N, lane + j * NL);
                            });
      if (p.z) {
        const float y = reduce_scatter<NL>(acc, lane);
        const int k = k0 + lane;
        if (s.active && k < K)
          st<T>(p.dz, off3(p.sdz, s.b, s.d, t0 + k), s_dzf[cc][k] * (y + Dd * s_u[cc][k]));
      }
    }

    // 2. walk the chunk backwards
    for (int k0 = ((K - 1) / NL) * NL; k0 >= 0; k0 -= NL) {
      float sgB[NL], sgAh[NL];  // per step: this lane's part of <g, B_t> and <g exp(dt A) h_{t-1}, A>
#pragma unroll
      for (int i = NL - 1; i >= 0; --i) {
        const int k = k0 + i;
        sgB[i] = sgAh[i] = 0.f;
        if (k < K) {
          const int64_t t = t0 + k;
          const float dt = s_dt[cc][k], dy = s_dy[cc][k], dtu = dt * s_u[cc][k];
#pragma unroll
          for (int j = 0; j < NPT; ++j) {
            const int64_t n = lane + j * NL;
            const float Bt = bc_at(Bv, Bc[j], ok[j], t, N, n), Ct = bc_at(Cv, Cc[j], ok[j], t, N, n);
            const float hp = s_h[k * NS + j * NT + tid], hc = s_h[(k + 1) * NS + j * NT + tid];
            const float e = __expf(dt * A[j]);
            const float gn = g[j] + Ct * dy;  // adjoint of h_t
            const float geh = gn * e * hp;
            dA[j] += geh * dt;
            sgB[i] += gn * Bt;
            sgAh[i] += geh * A[j];
            g[j] = gn * e;                    // adjoint of h_{t-1} (before C_{t-1} dy_{t-1})
            const float vB = gn * dtu, vC = dy * hc;
            if (Bv) { if (ok[j]) atomicAdd(&s_dB[k * NP + n], vB); } else { dBc[j] += vB; }
            if (Cv) { if (ok[j]) atomicAdd(&s_dC[k * NP + n], vC); } else { dCc[j] += vC; }
          }
        }
      }
      const float sumB = reduce_scatter<NL>(sgB, lane), sumAh = reduce_scatter<NL>(sgAh, lane);
      const int k = k0 + lane;
      if (s.active && k < K) {
        const int64_t t = t0 + k;
        const float dt = s_dt[cc][k], uu = s_u[cc][k], dy = s_dy[cc][k];
        const float ddt = (sumB * uu + sumAh) * s_dsp[cc][k];
        st<T>(p.du, off3(p.sdu, s.b, s.d, t), dy * Dd + dt * sumB);
        st<T>(p.ddelta, off3(p.sddelta, s.b, s.d, t), ddt);
        dD_acc += dy * uu;
        dbias_acc += ddt;
      }
    }

    // 3. the block's sums of the packed dB/dC over its channels, one atomic per (t, n)
    if (Bv || Cv) {
      __syncthreads();
      for (int i = tid; i < K * N; i += NT) {
        const int k = i / static_cast<int>(N), n = i % static_cast<int>(N);
        if (Bv) atomicAdd(&dBv[(t0 + k) * N + n], s_dB[k * NP + n]);
        if (Cv) atomicAdd(&dCv[(t0 + k) * N + n], s_dC[k * NP + n]);
      }
    }
  }

#pragma unroll
  for (int j = 0; j < NPT; ++j) {
    if (!ok[j]) continue;
    const int64_t o = s.d * N + lane + j * NL;
    atomicAdd(&p.dA[o], dA[j]);
    if (!Bv) atomicAdd(&p.dB[o], dBc[j]);
    if (!Cv) atomicAdd(&p.dC[o], dCc[j]);
  }
  dD_acc = group_sum<NL>(dD_acc);
  dbias_acc = group_sum<NL>(dbias_acc);
  if (s.active && lane == 0) {
    if (p.dD) atomicAdd(&p.dD[s.d], dD_acc);
    if (p.dbias) atomicAdd(&p.dbias[s.d], dbias_acc);
  }
}

}  // namespace

void selective_scan_bwd(const ScanParams& p, uintptr_t stream) {
  if (p.batch * p.dim == 0) return;
  if (p.L < 1 || p.chunk < 1 || p.chunk > kMaxChunk || p.chunks_per_split < 1)
    throw std::invalid_argument("selective_scan_bwd_cuda: bad L / chunk / chunks_per_split");
  const int64_t nchunks = (p.L + p.chunk - 1) / p.chunk;
  const int64_t nsplits = (nchunks + p.chunks_per_split - 1) / p.chunks_per_split;
  if (nsplits > 65535) throw std::invalid_argument("selective_scan_bwd_cuda: more than 65535 splits");
  if (nsplits > 1 && (!p.seg_state || !p.seg_dt))
    throw std::invalid_argument("selective_scan_bwd_cuda: several splits need seg_state and seg_dt");
  DeviceGuard guard(p.device);
  const cudaStream_t st = apt::cuda::as_stream(stream);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_lanes(p.N, [&](auto nl, auto npt) {
      constexpr int NL = decltype(nl)::value, NPT = decltype(npt)::value;
      constexpr int CPB = channels_per_block(NL, NPT), NT = CPB * NL;
      const Tiling tl = make_tiling(p, CPB);
      const size_t floats = static_cast<size_t>(p.chunk + 1) * NT * NPT +
                            (p.gB ? static_cast<size_t>(p.chunk) * NL * NPT : 0) +
                            (p.gC ? static_cast<size_t>(p.chunk) * NL * NPT : 0);
      const size_t bytes = floats * sizeof(float);
      auto kernel = scan_bwd_kernel<T, NL, NPT>;
      apt::cuda::ensure_dynamic_smem(kernel, p.device, bytes, [&] {
        return "selective_scan_bwd_cuda: N=" + std::to_string(p.N) + " with chunk=" + std::to_string(p.chunk);
      });
      const unsigned gx = grid_x(tl.blocks);
      if (nsplits > 1) {
        scan_bwd_adjoint_kernel<T, NL, NPT><<<dim3(gx, static_cast<unsigned>(nsplits - 1)), NT, 0, st>>>(
            p, tl, nchunks, nsplits);
        APT_CUDA_CHECK(cudaGetLastError());
      }
      kernel<<<dim3(gx, static_cast<unsigned>(nsplits)), NT, bytes, st>>>(p, tl, nchunks, nsplits);
      APT_CUDA_CHECK(cudaGetLastError());
    });
  });
}

}  // namespace scan_cuda
}  // namespace apt
