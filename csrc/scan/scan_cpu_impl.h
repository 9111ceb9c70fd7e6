// Mamba selective scan CPU kernels (forward with chunk checkpoints, backward by in-chunk recomputation, decode step).
// Included by scan_cpu.cpp once per build, inside namespace apt::scan_cpu::<isa> (generic, AVX2+FMA, AVX-512);
// include nowhere else. Inner loops run over the N contiguous state entries so they vectorise.

// fexp (the vectorisable exp) comes from common/apt_cpu_simd.h.

// log1p(y) for y >= 0 without libm (a libm call per time step cost as much as the whole N loop): w = 1 + y = m 2^e
// with m in [sqrt(1/2), sqrt(2)) (found by offsetting the bits, no select, so that loops over it vectorise),
// log m = 2 atanh((m-1)/(m+1)) by its series (|s| < 0.172, 5 terms: ~1e-7), plus the rounding error of 1 + y.
static inline float flog1p(float y) {
  const float w = 1.0f + y;
  const float c = (y - (w - 1.0f)) / w;
  const int32_t off = 0x3f3504f3;  // bits of sqrt(1/2)
  int32_t bits;
  std::memcpy(&bits, &w, 4);
  const int32_t t = bits - off;
  const int32_t e = t >> 23;
  const int32_t mbits = (t & 0x7fffff) + off;
  float m;
  std::memcpy(&m, &mbits, 4);
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  const float lm = 2.0f * s * (1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9)))));
  return static_cast<float>(e) * 0.693147180559945f + lm + c;
}
// softplus, fast in fp32 (libm in fp64, with torch's threshold x > 20 -> x): as max(x, 0) + log1p(exp(-|x|)),
// which needs no threshold (past 20 the log1p term is below x's rounding) and no select, so chunk loops vectorise.
static inline float softplus(float x) { return std::max(x, 0.0f) + flog1p(fexp(-std::fabs(x))); }
static inline double softplus(double x) { return x <= 20.0 ? std::log1p(std::exp(x)) : x; }
// through exp(-|x|) in (0, 1]: fexp(+inf) is NaN (sigmoid(-inf) would be), and 1 / (1 + exp(-x)) loses accuracy
// for x << 0
static inline float sigmoid(float x) {
  const float e = fexp(-std::fabs(x));
  return (x >= 0.0f ? 1.0f : e) / (1.0f + e);
}
static inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
// d softplus / dx of the above: in fp32 plain sigmoid (it is 1 to rounding past 20, as the threshold's slope), with
// no select, so the backward's chunk loop vectorises; in fp64 with the threshold.
static inline float dsoftplus(float x) { return sigmoid(x); }
static inline double dsoftplus(double x) { return x <= 20.0 ? sigmoid(x) : 1.0; }

// (b, d) -> pointer to B_t (or C_t) at t = 0 and the step between consecutive t (0 for a constant B/C).
template <typename Acc>
static inline const Acc* bc_row(const Packed<Acc>& p, bool isB, int64_t b, int64_t d, int64_t& tstride) {
  const Acc* base = isB ? p.B : p.C;
  int64_t G = isB ? p.gB : p.gC;
  if (G == 0) { tstride = 0; return base + d * p.N; }
  tstride = p.N;
  return base + ((b * G + d / (p.dim / G)) * p.L) * p.N;
}
template <typename Acc>
static inline int64_t bc_offset(const Packed<Acc>& p, bool isB, int64_t b, int64_t d) {
  int64_t ts;
  return bc_row(p, isB, b, d, ts) - (isB ? p.B : p.C);
}

// Partial sums kept per time step for the dot products over N (y_t = <C_t, h_t>, <g_t, B_t>, ...): W lanes, W | N.
// The horizontal reduction of the W lanes then runs once per chunk, vectorised over the steps (reduce_lanes),
// instead of once per step inside the recurrence. W = 1 (a plain per-step reduction) for a runtime N.
// kVecLanes (fp32 lanes of the widest vector of the build) is set by scan_cpu.cpp before including this file.
template <int NT> constexpr int lanes_for() {
  return NT <= 0 ? 1 : NT % kVecLanes == 0 ? kVecLanes : NT % 8 == 0 ? 8 : NT % 4 == 0 ? 4 : 1;
}
constexpr int kMaxLanes = 16;

// out[k] = sum of the W partial sums ps[k * W .. k * W + W - 1], k0 <= k < K.
template <int W, typename Acc>
static inline void reduce_lanes_tail(const Acc* ps, int64_t k0, int64_t K, Acc* out) {
  for (int64_t k = k0; k < K; ++k) {
    Acc s = 0;
    for (int l = 0; l < W; ++l) s += ps[k * W + l];
    out[k] = s;
  }
}
template <int W, typename Acc> static inline void reduce_lanes(const Acc* ps, int64_t K, Acc* out) {
  reduce_lanes_tail<W>(ps, 0, K, out);
}
#if defined(__GNUC__) || defined(__clang__)
// fp32 with 8 lanes: 8 steps at a time by a transpose-and-add tree in GCC vector types (one shufps/vperm2f128 and
// add per node with AVX, pairs of SSE ops in the generic build): 21 vector ops for 8 sums instead of 6 per sum.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
static inline v8f pair_sum(v8f a, v8f b) {  // within each 128-bit half: [a0+a1, a2+a3, b0+b1, b2+b3]
  return __builtin_shuffle(a, b, v8i{0, 2, 8, 10, 4, 6, 12, 14}) +
         __builtin_shuffle(a, b, v8i{1, 3, 9, 11, 5, 7, 13, 15});
}
// The 8 sums of r[0..7], as one vector.
static inline v8f sum8x8(const v8f* r) {
  const v8f e = pair_sum(pair_sum(r[0], r[1]), pair_sum(r[2], r[3]));  // rows 0-3, low and high halves
  const v8f f = pair_sum(pair_sum(r[4], r[5]), pair_sum(r[6], r[7]));
  return __builtin_shuffle(e, f, v8i{0, 1, 2, 3, 8, 9, 10, 11}) +
         __builtin_shuffle(e, f, v8i{4, 5, 6, 7, 12, 13, 14, 15});
}
template <int W> static inline void reduce_lanes_f32(const float* ps, int64_t K, float* out) {
  static_assert(W == 8 || W == 16, "8 or 16 lanes");
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    v8f r[8];
    for (int i = 0; i < 8; ++i) {
      std::memcpy(&r[i], ps + (k + i) * W, sizeof(v8f));
      if (W == 16) {
        v8f hi;
        std::memcpy(&hi, ps + (k + i) * W + 8, sizeof(v8f));
        r[i] += hi;
      }
    }
    const v8f sum = sum8x8(r);
    std::memcpy(out + k, &sum, sizeof sum);
  }
  reduce_lanes_tail<W>(ps, k, K, out);
}
template <> inline void reduce_lanes<8, float>(const float* ps, int64_t K, float* out) {
  reduce_lanes_f32<8>(ps, K, out);
}
template <> inline void reduce_lanes<16, float>(const float* ps, int64_t K, float* out) {
  reduce_lanes_f32<16>(ps, K, out);
}
#endif

// Per-thread scratch sizes (values of the accumulation dtype) of scan_fwd and scan_bwd.
static inline int64_t fwd_scratch_per_thread(int64_t N, int64_t chunk) { return N + 3 * chunk + kMaxLanes * chunk; }
static inline int64_t bwd_scratch_per_thread(int64_t N, int64_t chunk) {
  return (2 * chunk + 1) * N + N + 7 * chunk + 2 * kMaxLanes * chunk;
}

// dt_t (bias, softplus) and u_t for t0 <= t < t0 + K of row (b, d), into contiguous buffers: the transcendental
// part then runs as one vectorised loop per chunk instead of once per step inside the recurrence. With `sig`, also
// d softplus / d raw there (dsoftplus), for the backward.
template <typename T>
static inline void load_dt_u(const IO<T>& io, int64_t b, int64_t d, int64_t t0, int64_t K, acc_t<T> bias,
                             bool softplus_dt, acc_t<T>* dts, acc_t<T>* us, acc_t<T>* sig = nullptr) {
  for (int64_t k = 0; k < K; ++k) {
    dts[k] = load_f(io.delta + io.sdelta.at(b, d, t0 + k)) + bias;
    us[k] = load_f(io.u + io.su.at(b, d, t0 + k));
  }
  if (!softplus_dt) return;
  if (sig) {
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) sig[k] = dsoftplus(dts[k]);
  }
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) dts[k] = softplus(dts[k]);
}

// Loads the K values of a (batch, dim, L) tensor of row (b, d) from t0 into a contiguous buffer.
template <typename T>
static inline void load_row(const T* x, const S3& s, int64_t b, int64_t d, int64_t t0, int64_t K, acc_t<T>* out) {
  for (int64_t k = 0; k < K; ++k) out[k] = load_f(x + s.at(b, d, t0 + k));
}

#if defined(__GNUC__) || defined(__clang__)
#define APT_PREFETCH(ptr, rw) __builtin_prefetch((ptr), (rw), 3)
#else
#define APT_PREFETCH(ptr, rw) ((void)0)
#endif

// NT > 0: N known at compile time (the inner loops unroll fully and the state stays in registers); 0: runtime N,
// with one lane (W = 1): 3-7x slower per state. Compiled: N = 4, 8, 16 (Mamba-1) and 32, 64, 128 (Mamba-2 sizes).
// scratch: per thread fwd_scratch_per_thread values.
template <typename T, int NT>
void scan_fwd_n(const IO<T>& io, const Packed<acc_t<T>>& p, acc_t<T>* last, acc_t<T>* ckpt, int64_t chunk,
                bool softplus_dt, acc_t<T>* scratch) {
  using Acc = acc_t<T>;
  constexpr int W = lanes_for<NT>();
  const int64_t batch = p.batch, dim = p.dim, L = p.L, N = NT > 0 ? NT : p.N;
  const int64_t nchunks = (L + chunk - 1) / chunk;
#pragma omp parallel
  {
    Acc* mine = scratch + static_cast<int64_t>(omp_thread()) * fwd_scratch_per_thread(N, chunk);
    Acc hreg[NT > 0 ? NT : 1];  // with a compile-time N the state lives in registers
    Acc* h = NT > 0 ? hreg : mine;
    Acc* dts = mine + N;
    Acc* us = dts + chunk;
    Acc* ys = us + chunk;
    Acc* ps = ys + chunk;  // chunk x W partial sums of y
#pragma omp for schedule(static)
    for (int64_t i = 0; i < batch * dim; ++i) {
      const int64_t b = i / dim, d = i % dim;
      int64_t Bts, Cts;
      const Acc* Bp = bc_row(p, true, b, d, Bts);
      const Acc* Cp = bc_row(p, false, b, d, Cts);
      const Acc* Ad = p.A + d * N;
      const Acc Dd = p.D ? p.D[d] : Acc(0), bias = p.bias ? p.bias[d] : Acc(0);
      for (int64_t n = 0; n < N; ++n) h[n] = Acc(0);
      for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t t0 = c * chunk, K = std::min(chunk, L - t0);
        Acc* ck = ckpt + (i * nchunks + c) * N;
        for (int64_t n = 0; n < N; ++n) ck[n] = h[n];
        load_dt_u(io, b, d, t0, K, bias, softplus_dt, dts, us);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t t = t0 + k;
          const Acc dt = dts[k], dtu = dt * us[k];
          const Acc* Bt = Bp + t * Bts;
          const Acc* Ct = Cp + t * Cts;
          Acc part[W] = {};
          for (int64_t n0 = 0; n0 < N; n0 += W) {
#pragma omp simd
            for (int l = 0; l < W; ++l) {
              const int64_t n = n0 + l;
              Acc hn = fexp(dt * Ad[n]) * h[n] + dtu * Bt[n];
              h[n] = hn;
              part[l] += hn * Ct[n];
            }
          }
          std::memcpy(ps + k * W, part, sizeof part);
        }
        reduce_lanes<W>(ps, K, ys);
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) ys[k] += Dd * us[k];
        if (io.z) {
          load_row(io.z, io.sz, b, d, t0, K, dts);  // reuse as z buffer
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) ys[k] *= dts[k] * sigmoid(dts[k]);
        }
        for (int64_t k = 0; k < K; ++k) store_f(io.out + io.sout.at(b, d, t0 + k), ys[k]);
      }
      for (int64_t n = 0; n < N; ++n) last[i * N + n] = h[n];
    }
  }
}

template <typename T>
void scan_fwd(const IO<T>& io, const Packed<acc_t<T>>& p, acc_t<T>* last, acc_t<T>* ckpt, int64_t chunk,
              bool softplus_dt, acc_t<T>* scratch) {
  switch (p.N) {
    case 128: scan_fwd_n<T, 128>(io, p, last, ckpt, chunk, softplus_dt, scratch); break;
    case 64: scan_fwd_n<T, 64>(io, p, last, ckpt, chunk, softplus_dt, scratch); break;
    case 32: scan_fwd_n<T, 32>(io, p, last, ckpt, chunk, softplus_dt, scratch); break;
    case 16: scan_fwd_n<T, 16>(io, p, last, ckpt, chunk, softplus_dt, scratch); break;
    case 8: scan_fwd_n<T, 8>(io, p, last, ckpt, chunk, softplus_dt, scratch); break;
    case 4: scan_fwd_n<T, 4>(io, p, last, ckpt, chunk, softplus_dt, scratch); break;
    default: scan_fwd_n<T, 0>(io, p, last, ckpt, chunk, softplus_dt, scratch);
  }
}

// Gradients. Adjoint g of h_t, carried backwards: g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1} (+ dlast at t = L-1);
// then dB_t = g_t dt_t u_t, du_t += dt_t <g_t, B_t>, ddt_t = <g_t, B_t u_t + A exp(dt_t A) h_{t-1}>,
// dA += g_t dt_t exp(dt_t A) h_{t-1}. h_{t-1} is recomputed chunk by chunk from the forward's checkpoints.
// Per chunk: recompute the states (and y_t for the z gate), then the z gate's gradients for the whole chunk, then
// the adjoint walk, which keeps the per-step dot products as W-lane partial sums; du and ddelta are finished for
// the whole chunk after it (nothing in the recurrence depends on them).
// dA/dB/dC/dD/dbias are summed over (b, d) into per-thread private buffers `priv` (zeroed, nthreads * total), then
// reduced into the outputs, so there are no races and no atomics.
template <typename T, int NT>
void scan_bwd_n(const IO<T>& io, const Packed<acc_t<T>>& p, const Grads<T>& gr, const acc_t<T>* ckpt,
                int64_t chunk, bool softplus_dt, acc_t<T>* priv, acc_t<T>* scratch, int nthreads) {
  using Acc = acc_t<T>;
  constexpr int W = lanes_for<NT>();
  const int64_t batch = p.batch, dim = p.dim, L = p.L, N = NT > 0 ? NT : p.N;
  const int64_t nchunks = (L + chunk - 1) / chunk;
  const int64_t nA = dim * N;
  const int64_t nB = p.gB ? batch * p.gB * L * N : dim * N;
  const int64_t nC = p.gC ? batch * p.gC * L * N : dim * N;
  const int64_t nD = p.D ? dim : 0, nbias = p.bias ? dim : 0;
  const int64_t total = nA + nB + nC + nD + nbias;
  // rows contiguous along L (the usual layout) get software prefetches, a cache line (kLine values) apart
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
  const bool prefetch = io.su.s2 == 1 && io.sdelta.s2 == 1 && io.sdout.s2 == 1 && gr.sdu.s2 == 1 &&
                        gr.sddelta.s2 == 1 && (!io.z || (io.sz.s2 == 1 && gr.sdz.s2 == 1));
#pragma omp parallel
  {
    const int64_t th = omp_thread();
    Acc* pA = priv + th * total;
    Acc* pB = pA + nA;
    Acc* pC = pB + nB;
    Acc* pD = pC + nC;
    Acc* pbias = pD + nD;
    Acc* hs = scratch + th * bwd_scratch_per_thread(N, chunk);  // (chunk + 1) x N states: h_{t0-1} .. h_{t1-1}
    Acc* dAs = hs + (chunk + 1) * N;  // chunk x N: exp(dt_t A)
    Acc* gbuf = dAs + chunk * N;      // N: adjoint of h (runtime N)
    Acc* dts = gbuf + N;              // chunk each: dt_t, u_t, dsoftplus/draw, dy_t, z_t, and two dot products
    Acc* us = dts + chunk;
    Acc* sig = us + chunk;
    Acc* dys = sig + chunk;
    Acc* zs = dys + chunk;
    Acc* sgB = zs + chunk;
    Acc* sgAh = sgB + chunk;
    Acc* pgB = sgAh + chunk;          // chunk x W partial sums of <g_t, B_t> (and of y_t before the adjoint walk)
    Acc* pgAh = pgB + kMaxLanes * chunk;  // chunk x W partial sums of <g_t, A exp(dt_t A) h_{t-1}>
    // With a compile-time N, the adjoint, the recomputed state and dA's row sums live in registers: through
    // memory, each step's store feeds the next step's load, and store-to-load forwarding sits on the recurrence.
    Acc greg[NT > 0 ? NT : 1], hreg[NT > 0 ? NT : 1], dAreg[NT > 0 ? NT : 1];
    Acc* g = NT > 0 ? greg : gbuf;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < batch * dim; ++i) {
      const int64_t b = i / dim, d = i % dim;
      int64_t Bts, Cts;
      const Acc* Bp = bc_row(p, true, b, d, Bts);
      const Acc* Cp = bc_row(p, false, b, d, Cts);
      Acc* dBp = pB + bc_offset(p, true, b, d);
      Acc* dCp = pC + bc_offset(p, false, b, d);
      const Acc* Ad = p.A + d * N;
      Acc* dAd = pA + d * N;
      const Acc Dd = p.D ? p.D[d] : Acc(0), bias = p.bias ? p.bias[d] : Acc(0);
      Acc dD_acc = 0, dbias_acc = 0;
      Acc* dAsum = NT > 0 ? dAreg : dAd;
      for (int64_t n = 0; n < N; ++n) g[n] = gr.dlast ? gr.dlast[i * N + n] : Acc(0);
      if (NT > 0)
        for (int64_t n = 0; n < N; ++n) dAreg[n] = Acc(0);
      for (int64_t c = nchunks - 1; c >= 0; --c) {
        const int64_t t0 = c * chunk, K = std::min(chunk, L - t0);
        const Acc* ck = ckpt + (i * nchunks + c) * N;
        if (prefetch) {  // the chunk walked next (the previous one, or the next row's last): the walk goes down the
          // addresses a chunk (a few cache lines a row) at a time, which the hardware prefetchers miss, and the
          // row loads then stall on memory (~25% of the time at batch 2, dim 768, L 2048, fp32)
          const int64_t ni = c > 0 ? i : i + 1, nc = c > 0 ? c - 1 : nchunks - 1;
          if (ni < batch * dim) {
            const int64_t nb = ni / dim, nd = ni % dim, nt0 = nc * chunk, nK = std::min(chunk, L - nt0);
            for (int64_t k = 0; k < nK; k += kLine) {
              const int64_t t = nt0 + k;
              APT_PREFETCH(io.u + io.su.at(nb, nd, t), 0);
              APT_PREFETCH(io.delta + io.sdelta.at(nb, nd, t), 0);
              APT_PREFETCH(io.dout + io.sdout.at(nb, nd, t), 0);
              APT_PREFETCH(gr.du + gr.sdu.at(nb, nd, t), 1);
              APT_PREFETCH(gr.ddelta + gr.sddelta.at(nb, nd, t), 1);
              if (io.z) {
                APT_PREFETCH(io.z + io.sz.at(nb, nd, t), 0);
                APT_PREFETCH(gr.dz + gr.sdz.at(nb, nd, t), 1);
              }
            }
            APT_PREFETCH(ckpt + (ni * nchunks + nc) * N, 0);
          }
        }
        for (int64_t n = 0; n < N; ++n) hs[n] = ck[n];
        if (NT > 0)
          for (int64_t n = 0; n < N; ++n) hreg[n] = ck[n];
        load_dt_u(io, b, d, t0, K, bias, softplus_dt, dts, us, sig);
        for (int64_t k = 0; k < K; ++k) {  // recompute this chunk's states (and y_t's partial sums for the z gate)
          const int64_t t = t0 + k;
          const Acc dt = dts[k];
          const Acc dtu = dt * us[k];
          const Acc* Bt = Bp + t * Bts;
          const Acc* Ct = Cp + t * Cts;
          const Acc* hp = hs + k * N;
          Acc* hc = hs + (k + 1) * N;
          Acc* e = dAs + k * N;
          Acc part[W] = {};
          for (int64_t n0 = 0; n0 < N; n0 += W) {
#pragma omp simd
            for (int l = 0; l < W; ++l) {
              const int64_t n = n0 + l;
              Acc en = fexp(dt * Ad[n]);
              e[n] = en;
              Acc hn = en * (NT > 0 ? hreg[n] : hp[n]) + dtu * Bt[n];
              hc[n] = hn;
              if (NT > 0) hreg[n] = hn;
              part[l] += hn * Ct[n];
            }
          }
          if (io.z) std::memcpy(pgB + k * W, part, sizeof part);
        }
        load_row(io.dout, io.sdout, b, d, t0, K, dys);
        if (io.z) {  // dz, and dy through the gate
          reduce_lanes<W>(pgB, K, sgB);  // y_t before the gate
          load_row(io.z, io.sz, b, d, t0, K, zs);
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) {
            const Acc y = sgB[k] + Dd * us[k], zz = zs[k], sg = sigmoid(zz), dy = dys[k];
            sgAh[k] = dy * y * sg * (Acc(1) + zz * (Acc(1) - sg));  // dz
            dys[k] = dy * zz * sg;
          }
          for (int64_t k = 0; k < K; ++k) store_f(gr.dz + gr.sdz.at(b, d, t0 + k), sgAh[k]);
        }
        for (int64_t k = K - 1; k >= 0; --k) {  // the adjoint, backwards through the chunk
          const int64_t t = t0 + k;
          const Acc dt = dts[k];
          const Acc* Bt = Bp + t * Bts;
          const Acc* Ct = Cp + t * Cts;
          Acc* dBt = dBp + t * Bts;
          Acc* dCt = dCp + t * Cts;
          const Acc* hp = hs + k * N;
          const Acc* hc = hs + (k + 1) * N;
          const Acc* e = dAs + k * N;
          const Acc dy = dys[k];
          const Acc dtu = dt * us[k];
          Acc part_gB[W] = {}, part_gAh[W] = {};
          for (int64_t n0 = 0; n0 < N; n0 += W) {
#pragma omp simd
            for (int l = 0; l < W; ++l) {
              const int64_t n = n0 + l;
              const Acc gn = g[n] + Ct[n] * dy;
              const Acc geh = gn * e[n] * hp[n];
              dCt[n] += dy * hc[n];
              dBt[n] += gn * dtu;
              dAsum[n] += geh * dt;
              part_gB[l] += gn * Bt[n];
              part_gAh[l] += geh * Ad[n];
              g[n] = gn * e[n];
            }
          }
          std::memcpy(pgB + k * W, part_gB, sizeof part_gB);
          std::memcpy(pgAh + k * W, part_gAh, sizeof part_gAh);
        }
        reduce_lanes<W>(pgB, K, sgB);
        reduce_lanes<W>(pgAh, K, sgAh);
#pragma omp simd reduction(+ : dD_acc, dbias_acc)
        for (int64_t k = 0; k < K; ++k) {
          const Acc dy = dys[k], uu = us[k];
          dD_acc += dy * uu;
          zs[k] = dy * Dd + dts[k] * sgB[k];  // du
          Acc ddt = sgB[k] * uu + sgAh[k];
          if (softplus_dt) ddt *= sig[k];
          dbias_acc += ddt;
          sgAh[k] = ddt;
        }
        for (int64_t k = 0; k < K; ++k) {
          store_f(gr.du + gr.sdu.at(b, d, t0 + k), zs[k]);
          store_f(gr.ddelta + gr.sddelta.at(b, d, t0 + k), sgAh[k]);
        }
      }
      if (NT > 0)
        for (int64_t n = 0; n < N; ++n) dAd[n] += dAreg[n];
      if (p.D) pD[d] += dD_acc;
      if (p.bias) pbias[d] += dbias_acc;
    }
    // reduce the private buffers into the outputs (each thread a slice of the elements)
#pragma omp for schedule(static)
    for (int64_t j = 0; j < total; ++j) {
      Acc s = 0;
      for (int w = 0; w < nthreads; ++w) s += priv[static_cast<int64_t>(w) * total + j];
      if (j < nA) gr.dA[j] = s;
      else if (j < nA + nB) gr.dB[j - nA] = s;
      else if (j < nA + nB + nC) gr.dC[j - nA - nB] = s;
      else if (j < nA + nB + nC + nD) gr.dD[j - nA - nB - nC] = s;
      else gr.dbias[j - nA - nB - nC - nD] = s;
    }
  }
}

template <typename T>
void scan_bwd(const IO<T>& io, const Packed<acc_t<T>>& p, const Grads<T>& gr, const acc_t<T>* ckpt,
              int64_t chunk, bool softplus_dt, acc_t<T>* priv, acc_t<T>* scratch, int nthreads) {
  switch (p.N) {
    case 128: scan_bwd_n<T, 128>(io, p, gr, ckpt, chunk, softplus_dt, priv, scratch, nthreads); break;
    case 64: scan_bwd_n<T, 64>(io, p, gr, ckpt, chunk, softplus_dt, priv, scratch, nthreads); break;
    case 32: scan_bwd_n<T, 32>(io, p, gr, ckpt, chunk, softplus_dt, priv, scratch, nthreads); break;
    case 16: scan_bwd_n<T, 16>(io, p, gr, ckpt, chunk, softplus_dt, priv, scratch, nthreads); break;
    case 8: scan_bwd_n<T, 8>(io, p, gr, ckpt, chunk, softplus_dt, priv, scratch, nthreads); break;
    case 4: scan_bwd_n<T, 4>(io, p, gr, ckpt, chunk, softplus_dt, priv, scratch, nthreads); break;
    default: scan_bwd_n<T, 0>(io, p, gr, ckpt, chunk, softplus_dt, priv, scratch, nthreads);
  }
}

// One decode step, in place on the state: h = exp(dt A) h + dt B x; y = <C, h> + D x (times silu(z)). A decode
// row is only N (16) states, so the per-row scalar work (softplus of dt, silu of z, the dot product's horizontal
// sum) cost more than the states themselves: rows go in tiles of kStepTile of one batch row, that work runs
// vectorised over the tile, and the state loop keeps W lane partial sums per row that reduce_lanes sums for the
// whole tile. Small steps (decode at batch 1) run on one thread.
constexpr int64_t kStepTile = 64;

template <typename T, typename S, int NT>
void state_update_n(const StepIO<T, S>& io, const Packed<acc_t<T>>& p, bool softplus_dt) {
  using Acc = acc_t<T>;
  constexpr int W = std::is_same_v<Acc, float> ? lanes_for<NT>() : 1;
  const int64_t batch = p.batch, dim = p.dim, N = NT > 0 ? NT : p.N;
  const int64_t sn = io.sstate[2], tiles = (dim + kStepTile - 1) / kStepTile;
#pragma omp parallel for schedule(static) if (batch * dim * N > (int64_t(1) << 16))
  for (int64_t task = 0; task < batch * tiles; ++task) {
    const int64_t b = task / tiles, d0 = (task % tiles) * kStepTile, rows = std::min(kStepTile, dim - d0);
    Acc dts[kStepTile], xs[kStepTile], ys[kStepTile], part[kStepTile * W];
    for (int64_t r = 0; r < rows; ++r) {
      dts[r] = load_f(io.dt + b * io.sdt[0] + (d0 + r) * io.sdt[1]) + (p.bias ? p.bias[d0 + r] : Acc(0));
      xs[r] = load_f(io.x + b * io.sx[0] + (d0 + r) * io.sx[1]);
    }
    if (softplus_dt) {
#pragma omp simd
      for (int64_t r = 0; r < rows; ++r) dts[r] = softplus(dts[r]);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t d = d0 + r;
      int64_t ts;
      const Acc* Bt = bc_row(p, true, b, d, ts);
      const Acc* Ct = bc_row(p, false, b, d, ts);
      const Acc* Ad = p.A + d * N;
      const Acc dt = dts[r], dtx = dt * xs[r];
      S* st = io.state + b * io.sstate[0] + d * io.sstate[1];
      Acc pl[W] = {};
      bool fused = false;
      if constexpr (std::is_same_v<S, Acc>) {  // the state in the accumulation dtype, contiguous: one pass
        if (sn == 1) {
          for (int64_t n0 = 0; n0 < N; n0 += W) {
#pragma omp simd
            for (int l = 0; l < W; ++l) {
              const Acc hn = fexp(dt * Ad[n0 + l]) * st[n0 + l] + dtx * Bt[n0 + l];
              st[n0 + l] = hn;
              pl[l] += hn * Ct[n0 + l];
            }
          }
          fused = true;
        }
      }
      if (!fused) {
        for (int64_t n0 = 0; n0 < N; n0 += W) {
          Acc da[W];
#pragma omp simd
          for (int l = 0; l < W; ++l) da[l] = fexp(dt * Ad[n0 + l]);
          for (int l = 0; l < W; ++l) {
            S* sp = st + (n0 + l) * sn;
            const Acc hn = da[l] * static_cast<Acc>(load_f(sp)) + dtx * Bt[n0 + l];
            store_f(sp, static_cast<acc_t<S>>(hn));
            pl[l] += hn * Ct[n0 + l];
          }
        }
      }
      for (int l = 0; l < W; ++l) part[r * W + l] = pl[l];
    }
    reduce_lanes<W, Acc>(part, rows, ys);
    const Acc* Dd = p.D ? p.D + d0 : nullptr;
    if (Dd) {
#pragma omp simd
      for (int64_t r = 0; r < rows; ++r) ys[r] += Dd[r] * xs[r];
    }
    if (io.z) {
      Acc zs[kStepTile];
      for (int64_t r = 0; r < rows; ++r) zs[r] = load_f(io.z + b * io.sz[0] + (d0 + r) * io.sz[1]);
#pragma omp simd
      for (int64_t r = 0; r < rows; ++r) ys[r] *= zs[r] * sigmoid(zs[r]);
    }
    for (int64_t r = 0; r < rows; ++r) store_f(io.y + b * io.sy[0] + (d0 + r) * io.sy[1], ys[r]);
  }
}

template <typename T, typename S>
void state_update(const StepIO<T, S>& io, const Packed<acc_t<T>>& p, bool softplus_dt) {
  switch (p.N) {
    case 128: state_update_n<T, S, 128>(io, p, softplus_dt); break;
    case 64: state_update_n<T, S, 64>(io, p, softplus_dt); break;
    case 32: state_update_n<T, S, 32>(io, p, softplus_dt); break;
    case 16: state_update_n<T, S, 16>(io, p, softplus_dt); break;
    case 8: state_update_n<T, S, 8>(io, p, softplus_dt); break;
    case 4: state_update_n<T, S, 4>(io, p, softplus_dt); break;
    default: state_update_n<T, S, 0>(io, p, softplus_dt);
  }
}
