// Mamba selective scan CPU kernels (forward with chunk checkpoints, backward by in-chunk recomputation, decode step).
// Included twice by scan_cpu.cpp, inside namespace apt::scan_cpu::<isa> (once generic, once built for AVX2+FMA);
// include nowhere else. Inner loops run over the N contiguous state entries so they vectorise.

// exp for the inner loops: Cody-Waite range reduction + degree-6 polynomial (rel. error ~2e-7, fp32 rounding level)
// that the compiler vectorises, unlike a libm call. Below -87.3 the result is not 0 but a value < 1e-30 (the power of
// two is clamped to 2^-126), above 88.7 it is inf. The clamp is on the integer exponent: clamping x itself makes GCC
// branch (it folds exp of the clamp bounds) and then refuse to vectorise the loop.
static inline float fexp(float x) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float kf = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - kf * 0.693359375f;  // ln2 split in a high part exact in fp32 ...
  r = r - kf * -2.12194440e-4f;      // ... and the low remainder
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t k = static_cast<int32_t>(kf);
  k = k < -126 ? -126 : k;
  k = k > 128 ? 128 : k;
  int32_t bits = (k + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}
static inline double fexp(double x) { return std::exp(x); }

// log1p(y) for y >= 0 without libm (a libm call per time step cost as much as the whole N loop): w = 1 + y = m 2^e,
// log m = 2 atanh((m-1)/(m+1)) by its series (|s| < 0.172, 5 terms: ~1e-7), plus the rounding error of 1 + y.
static inline float flog1p(float y) {
  const float w = 1.0f + y;
  const float c = (y - (w - 1.0f)) / w;
  int32_t bits;
  std::memcpy(&bits, &w, 4);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  int32_t mbits = (bits & 0x7fffff) | 0x3f800000;
  float m;
  std::memcpy(&m, &mbits, 4);
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  const float lm = 2.0f * s * (1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9)))));
  return static_cast<float>(e) * 0.693147180559945f + lm + c;
}
// softplus with torch's threshold (x > 20 -> x) and sigmoid, fast in fp32, libm in fp64.
static inline float softplus(float x) { return x <= 20.0f ? flog1p(fexp(x)) : x; }
static inline double softplus(double x) { return x <= 20.0 ? std::log1p(std::exp(x)) : x; }
static inline float sigmoid(float x) { return 1.0f / (1.0f + fexp(-x)); }
static inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

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

// dt_t (bias, softplus) and u_t for t0 <= t < t0 + K of row (b, d), into contiguous buffers: the transcendental
// part then runs as one vectorised loop per chunk instead of once per step inside the recurrence.
template <typename T>
static inline void load_dt_u(const IO<T>& io, int64_t b, int64_t d, int64_t t0, int64_t K, acc_t<T> bias,
                             bool softplus_dt, acc_t<T>* dts, acc_t<T>* us) {
  for (int64_t k = 0; k < K; ++k) {
    dts[k] = load_f(io.delta + io.sdelta.at(b, d, t0 + k)) + bias;
    us[k] = load_f(io.u + io.su.at(b, d, t0 + k));
  }
  if (softplus_dt) {
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) dts[k] = softplus(dts[k]);
  }
}

// NT > 0: N known at compile time (the inner loops unroll fully and the state stays in registers); 0: runtime N.
// scratch: per thread N + 3 * chunk values.
template <typename T, int NT>
void scan_fwd_n(const IO<T>& io, const Packed<acc_t<T>>& p, acc_t<T>* last, acc_t<T>* ckpt, int64_t chunk,
                bool softplus_dt, acc_t<T>* scratch) {
  using Acc = acc_t<T>;
  const int64_t batch = p.batch, dim = p.dim, L = p.L, N = NT > 0 ? NT : p.N;
  const int64_t nchunks = (L + chunk - 1) / chunk;
#pragma omp parallel
  {
    Acc* mine = scratch + static_cast<int64_t>(omp_thread()) * (N + 3 * chunk);
    Acc hreg[NT > 0 ? NT : 1];  // with a compile-time N the state lives in registers
    Acc* h = NT > 0 ? hreg : mine;
    Acc* dts = mine + N;
    Acc* us = dts + chunk;
    Acc* ys = us + chunk;
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
          Acc y = 0;
#pragma omp simd reduction(+ : y)
          for (int64_t n = 0; n < N; ++n) {
            Acc hn = fexp(dt * Ad[n]) * h[n] + dtu * Bt[n];
            h[n] = hn;
            y += hn * Ct[n];
          }
          ys[k] = y + Dd * us[k];
        }
        if (io.z) {
          for (int64_t k = 0; k < K; ++k) dts[k] = load_f(io.z + io.sz.at(b, d, t0 + k));  // reuse as z buffer
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
    case 16: scan_fwd_n<T, 16>(io, p, last, ckpt, chunk, softplus_dt, scratch); break;
    case 8: scan_fwd_n<T, 8>(io, p, last, ckpt, chunk, softplus_dt, scratch); break;
    case 4: scan_fwd_n<T, 4>(io, p, last, ckpt, chunk, softplus_dt, scratch); break;
    default: scan_fwd_n<T, 0>(io, p, last, ckpt, chunk, softplus_dt, scratch);
  }
}

// Gradients. Adjoint g of h_t, carried backwards: g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1} (+ dlast at t = L-1);
// then dB_t = g_t dt_t u_t, du_t += dt_t <g_t, B_t>, ddt_t = <g_t, B_t u_t + A exp(dt_t A) h_{t-1}>,
// dA += g_t dt_t exp(dt_t A) h_{t-1}. h_{t-1} is recomputed chunk by chunk from the forward's checkpoints.
// dA/dB/dC/dD/dbias are summed over (b, d) into per-thread private buffers `priv` (zeroed, nthreads * total), then
// reduced into the outputs, so there are no races and no atomics.
template <typename T, int NT>
void scan_bwd_n(const IO<T>& io, const Packed<acc_t<T>>& p, const Grads<T>& gr, const acc_t<T>* ckpt,
                int64_t chunk, bool softplus_dt, acc_t<T>* priv, acc_t<T>* scratch, int64_t scratch_per_thread,
                int nthreads) {
  using Acc = acc_t<T>;
  const int64_t batch = p.batch, dim = p.dim, L = p.L, N = NT > 0 ? NT : p.N;
  const int64_t nchunks = (L + chunk - 1) / chunk;
  const int64_t nA = dim * N;
  const int64_t nB = p.gB ? batch * p.gB * L * N : dim * N;
  const int64_t nC = p.gC ? batch * p.gC * L * N : dim * N;
  const int64_t nD = p.D ? dim : 0, nbias = p.bias ? dim : 0;
  const int64_t total = nA + nB + nC + nD + nbias;
#pragma omp parallel
  {
    const int64_t th = omp_thread();
    Acc* pA = priv + th * total;
    Acc* pB = pA + nA;
    Acc* pC = pB + nB;
    Acc* pD = pC + nC;
    Acc* pbias = pD + nD;
    Acc* hs = scratch + th * scratch_per_thread;  // (chunk + 1) x N states: h_{t0-1} .. h_{t1-1}
    Acc* dAs = hs + (chunk + 1) * N;               // chunk x N: exp(dt_t A)
    Acc* dts = dAs + chunk * N;                    // chunk: dt_t
    Acc* us = dts + chunk;                         // chunk: u_t
    Acc greg[NT > 0 ? NT : 1];
    Acc* g = NT > 0 ? greg : us + chunk;           // N: adjoint of h
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
      for (int64_t n = 0; n < N; ++n) g[n] = gr.dlast ? gr.dlast[i * N + n] : Acc(0);
      for (int64_t c = nchunks - 1; c >= 0; --c) {
        const int64_t t0 = c * chunk, K = std::min(chunk, L - t0);
        const Acc* ck = ckpt + (i * nchunks + c) * N;
        for (int64_t n = 0; n < N; ++n) hs[n] = ck[n];
        load_dt_u(io, b, d, t0, K, bias, softplus_dt, dts, us);
        for (int64_t k = 0; k < K; ++k) {  // recompute this chunk's states
          const int64_t t = t0 + k;
          const Acc dt = dts[k];
          const Acc dtu = dt * us[k];
          const Acc* Bt = Bp + t * Bts;
          const Acc* hp = hs + k * N;
          Acc* hc = hs + (k + 1) * N;
          Acc* e = dAs + k * N;
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) {
            Acc en = fexp(dt * Ad[n]);
            e[n] = en;
            hc[n] = en * hp[n] + dtu * Bt[n];
          }
        }
        for (int64_t k = K - 1; k >= 0; --k) {  // and walk it backwards
          const int64_t t = t0 + k;
          const Acc dt = dts[k];
          const Acc uu = us[k];
          const Acc* Bt = Bp + t * Bts;
          const Acc* Ct = Cp + t * Cts;
          Acc* dBt = dBp + t * Bts;
          Acc* dCt = dCp + t * Cts;
          const Acc* hp = hs + k * N;
          const Acc* hc = hs + (k + 1) * N;
          const Acc* e = dAs + k * N;
          Acc dy = load_f(io.dout + io.sdout.at(b, d, t));
          if (io.z) {
            Acc y = 0;
#pragma omp simd reduction(+ : y)
            for (int64_t n = 0; n < N; ++n) y += hc[n] * Ct[n];
            y += Dd * uu;
            const Acc zz = load_f(io.z + io.sz.at(b, d, t));
            const Acc sg = sigmoid(zz);
            store_f(gr.dz + gr.sdz.at(b, d, t), dy * y * sg * (Acc(1) + zz * (Acc(1) - sg)));
            dy = dy * zz * sg;
          }
          dD_acc += dy * uu;
          const Acc dtu = dt * uu;
          Acc sum_gB = 0, sum_gAh = 0;
#pragma omp simd reduction(+ : sum_gB, sum_gAh)
          for (int64_t n = 0; n < N; ++n) {
            const Acc gn = g[n] + Ct[n] * dy;
            const Acc geh = gn * e[n] * hp[n];
            dCt[n] += dy * hc[n];
            dBt[n] += gn * dtu;
            dAd[n] += geh * dt;
            sum_gB += gn * Bt[n];
            sum_gAh += geh * Ad[n];
            g[n] = gn * e[n];
          }
          store_f(gr.du + gr.sdu.at(b, d, t), dy * Dd + dt * sum_gB);
          Acc ddt = sum_gB * uu + sum_gAh;
          if (softplus_dt) {
            const Acc raw = load_f(io.delta + io.sdelta.at(b, d, t)) + bias;
            if (raw <= Acc(20)) ddt *= sigmoid(raw);
          }
          dbias_acc += ddt;
          store_f(gr.ddelta + gr.sddelta.at(b, d, t), ddt);
        }
      }
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
              int64_t chunk, bool softplus_dt, acc_t<T>* priv, acc_t<T>* scratch, int64_t scratch_per_thread,
              int nthreads) {
  switch (p.N) {
    case 16: scan_bwd_n<T, 16>(io, p, gr, ckpt, chunk, softplus_dt, priv, scratch, scratch_per_thread, nthreads); break;
    case 8: scan_bwd_n<T, 8>(io, p, gr, ckpt, chunk, softplus_dt, priv, scratch, scratch_per_thread, nthreads); break;
    case 4: scan_bwd_n<T, 4>(io, p, gr, ckpt, chunk, softplus_dt, priv, scratch, scratch_per_thread, nthreads); break;
    default: scan_bwd_n<T, 0>(io, p, gr, ckpt, chunk, softplus_dt, priv, scratch, scratch_per_thread, nthreads);
  }
}

// One decode step, in place on the state: h = exp(dt A) h + dt B x; y = <C, h> + D x (times silu(z)).
template <typename T, typename S>
void state_update(const StepIO<T, S>& io, const Packed<acc_t<T>>& p, bool softplus_dt) {
  using Acc = acc_t<T>;
  const int64_t batch = p.batch, dim = p.dim, N = p.N;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < batch * dim; ++i) {
    const int64_t b = i / dim, d = i % dim;
    int64_t ts;
    const Acc* Bt = bc_row(p, true, b, d, ts);
    const Acc* Ct = bc_row(p, false, b, d, ts);
    const Acc* Ad = p.A + d * N;
    Acc dt = load_f(io.dt + b * io.sdt[0] + d * io.sdt[1]) + (p.bias ? p.bias[d] : Acc(0));
    if (softplus_dt) dt = softplus(dt);
    const Acc xx = load_f(io.x + b * io.sx[0] + d * io.sx[1]);
    const Acc dtx = dt * xx;
    S* st = io.state + b * io.sstate[0] + d * io.sstate[1];
    const int64_t sn = io.sstate[2];
    Acc y = 0;
    for (int64_t n = 0; n < N; ++n) {
      Acc hn = fexp(dt * Ad[n]) * static_cast<Acc>(load_f(st + n * sn)) + dtx * Bt[n];
      store_f(st + n * sn, static_cast<acc_t<S>>(hn));
      y += hn * Ct[n];
    }
    y += (p.D ? p.D[d] : Acc(0)) * xx;
    if (io.z) {
      const Acc zz = load_f(io.z + b * io.sz[0] + d * io.sz[1]);
      y *= zz * sigmoid(zz);
    }
    store_f(io.y + b * io.sy[0] + d * io.sy[1], y);
  }
}
