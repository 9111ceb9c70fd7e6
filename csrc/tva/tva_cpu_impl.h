// TVA attention CPU kernels on packed fp32 operands (tva_cpu.cpp packs and unpacks them; see Packed there).
// Included by tva_cpu.cpp once per build, inside namespace apt::tva_cpu::<isa> (generic, AVX2+FMA, AVX-512), after
// kR (rows of a register tile), kCV (16-float column groups per tile) and kW (floats in the build's native vector:
// 4 SSE, 8 AVX2, 16 AVX-512) are defined; include nowhere else.
// Every product is a register-tiled micro-kernel on 64×64 blocks (kBlk) in one of two shapes:
//   nt:  C (rows×64) = A (rows×K, row-major) · Bt (K×64 columns of a transposed operand)  (scores, dP)
//   acc: C (rows×N) = alpha∘C + A (rows×K) · B (K×N, row-major)                            (P·V, dV, dK, dQ)
// with K the padded head dim Dp (a multiple of 16) or the 64 of a block, so no loop has a tail.

// Vectors of the build's native width: GCC splits a wider generic vector into registers poorly (under AVX2 the
// 64-byte tiles went through the stack, and the kernels ran 2-4x slower than the SSE build).
typedef float vf __attribute__((vector_size(4 * kW)));
typedef float vfu __attribute__((vector_size(4 * kW), aligned(4), may_alias));  // unaligned loads/stores
static_assert(16 % kW == 0, "a 16-float column group is a whole number of native vectors");
constexpr int kVG = 16 / kW;  // native vectors per 16-float group

static inline vf ld(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline void st(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }

// kW consecutive inputs of any dtype as fp32 lanes, so the decode path reads a bf16/fp16 KV cache in place instead of
// converting each block into a buffer first (that conversion was half of a bf16 decode step): in the x86 builds by
// intrinsics (F16C; bf16 a widening shift, which GCC 12 splits into two halves and a merge when written generically:
// bf16 decode ran ~1.6x slower than fp16 that way), elsewhere lane by lane through apt_common.h's to_float.
typedef uint32_t vu __attribute__((vector_size(4 * kW)));
static inline vf ldx(const float* p) { return ld(p); }
template <typename T>
static inline vf ldx_lanes(const T* p) {
  vf r;
  for (int e = 0; e < kW; ++e) r[e] = to_float(p[e]);
  return r;
}
static inline vf ldx(const BFloat16* p) {
#if APT_TVA_ISA == 512  // zero-masked: GCC 12 warns that the plain forms' undefined pass-through is uninitialized
  return (vf)((vu)_mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))) << 16);
#elif APT_TVA_ISA == 2
  return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  return ldx_lanes(p);
#endif
}
static inline vf ldx(const Half* p) {
#if APT_TVA_ISA == 512
  return (vf)_mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif APT_TVA_ISA == 2
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  return ldx_lanes(p);
#endif
}
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline float hmax(vf x) {  // NaN lanes are passed over
  float r = NEG_INF;
  for (int e = 0; e < kW; ++e) r = x[e] > r ? x[e] : r;
  return r;
}
static inline float hsum(vf x) {
  float r = x[0];
  for (int e = 1; e < kW; ++e) r += x[e];
  return r;
}

// One R×(16·CV) register tile of C = [alpha∘C +] op(A) · B over K: op(A) = A (rows×K, lda) or, with TA, Aᵀ of A
// stored (K×rows, lda); ZERO starts from 0 instead of loading C. B may be an input's rows in its own dtype (TB).
template <int R, int CV, bool TA, bool ZERO, typename TB = float>
static inline void acc_tile(const float* A, int64_t lda, const TB* B, int64_t ldb, float* C, int64_t ldc,
                            int64_t K, const float* alpha) {
  constexpr int NV = CV * kVG;  // native vectors across the tile's 16·CV columns
  vf acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float s = alpha ? alpha[r] : 1.0f;
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = ZERO ? vf{} : ld(C + r * ldc + kW * c) * s;
  }
  for (int64_t kk = 0; kk < K; ++kk) {
    vf b[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) b[c] = ldx(B + kk * ldb + kW * c);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float a = TA ? A[kk * lda + r] : A[r * lda + kk];
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] += a * b[c];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) st(C + r * ldc + kW * c, acc[r][c]);
}

// C (rows×kBlk, dense) = A (rows×K, lda) · Bt (K×kBlk, ldb); rows a multiple of kR
static inline void gemm_nt(const float* A, int64_t lda, const float* Bt, int64_t ldb, float* C, int64_t rows,
                           int64_t K) {
  for (int64_t i0 = 0; i0 < rows; i0 += kR)
    for (int64_t j0 = 0; j0 < kBlk; j0 += 16 * kCV)
      acc_tile<kR, kCV, false, true>(A + i0 * lda, lda, Bt + j0, ldb, C + i0 * kBlk + j0, kBlk, K, nullptr);
}

template <int R, bool TA, typename TB>
static inline void gemm_acc_rows(const float* A, int64_t lda, const TB* B, int64_t ldb, float* C, int64_t ldc,
                                 int64_t K, int64_t N, const float* alpha) {
  int64_t j0 = 0;
  for (; j0 + 16 * kCV <= N; j0 += 16 * kCV)
    acc_tile<R, kCV, TA, false, TB>(A, lda, B + j0, ldb, C + j0, ldc, K, alpha);
  if (kCV > 2)
    for (; j0 + 32 <= N; j0 += 32) acc_tile<R, 2, TA, false, TB>(A, lda, B + j0, ldb, C + j0, ldc, K, alpha);
  for (; j0 < N; j0 += 16) acc_tile<R, 1, TA, false, TB>(A, lda, B + j0, ldb, C + j0, ldc, K, alpha);
}

// rows past the last multiple of kR one at a time (decode: 1..4 queries, no padding rows computed)
template <bool TA, typename TB>
static inline void gemm_acc_impl(const float* A, int64_t lda, const TB* B, int64_t ldb, float* C, int64_t ldc,
                                 int64_t rows, int64_t K, int64_t N, const float* alpha) {
  int64_t i0 = 0;
  for (; i0 + kR <= rows; i0 += kR)
    gemm_acc_rows<kR, TA, TB>(TA ? A + i0 : A + i0 * lda, lda, B, ldb, C + i0 * ldc, ldc, K, N,
                              alpha ? alpha + i0 : nullptr);
  for (; i0 < rows; ++i0)
    gemm_acc_rows<1, TA, TB>(TA ? A + i0 : A + i0 * lda, lda, B, ldb, C + i0 * ldc, ldc, K, N,
                             alpha ? alpha + i0 : nullptr);
}

// C (rows×N, ldc) = alpha[i]·C + A (rows×K, lda) · B (K×N, ldb); alpha null = 1; N a multiple of 16; B fp32, or
// an input's rows in its dtype (the forward's values read in place)
template <typename TB = float>
static inline void gemm_acc(const float* A, int64_t lda, const TB* B, int64_t ldb, float* C, int64_t ldc,
                            int64_t rows, int64_t K, int64_t N, const float* alpha) {
  gemm_acc_impl<false, TB>(A, lda, B, ldb, C, ldc, rows, K, N, alpha);
}
// C (rows×N, ldc) += Aᵀ · B with A stored (K×rows, lda): dQ from the transposed dS of the fused backward
static inline void gemm_acc_ta(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                               int64_t rows, int64_t K, int64_t N) {
  gemm_acc_impl<true, float>(A, lda, B, ldb, C, ldc, rows, K, N, nullptr);
}

// Masks a score block: rows are queries m0.. and columns keys n0.. (or, transposed, rows keys and columns queries).
// Padded keys and keys past Tk get -inf where the key bias is -inf (assigned, not added: a NaN or inf key in a padded
// slot, e.g. an unwritten KV-cache position, must not reach the softmax); the causal/window band is applied
// elementwise only on the blocks it cuts.
static inline void mask_block(const Packed& p, int64_t b, int64_t m0, int64_t n0, int64_t rows, bool transposed,
                              float* S) {
  const int64_t nq = transposed ? kBlk : rows, nk = transposed ? rows : kBlk;
  if (p.any_pad || n0 + nk > p.Tk) {
    const float* kb = p.kbias + b * p.Tkp + n0;
    if (!transposed) {
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < kBlk; ++j) S[i * kBlk + j] = kb[j] < 0.0f ? NEG_INF : S[i * kBlk + j];
    } else {
      for (int64_t j = 0; j < rows; ++j)
        if (kb[j] < 0.0f)
          for (int64_t i = 0; i < kBlk; ++i) S[j * kBlk + i] = NEG_INF;
    }
  }
  const int64_t p0 = m0 + p.Tk - p.Tq;
  if (band_covers(p.mask, p0, p0 + nq - 1, n0, n0 + nk - 1)) return;
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t j = 0; j < nk; ++j)
      if (!tva::visible(p.mask, p0 + i, n0 + j)) S[transposed ? j * kBlk + i : i * kBlk + j] = NEG_INF;
}

// Online-softmax step on a masked score block (rows×kBlk): S becomes exp(S - m_new), alpha = exp(m_old - m_new),
// l = l·alpha + Σ exp. Rows with no visible key so far keep m = -inf, l = 0 (exp against 0, never -inf - -inf).
static inline void softmax_step(float* S, int64_t rows, float* m, float* l, float* alpha) {
  for (int64_t i = 0; i < rows; ++i) {
    float* s = S + i * kBlk;
    vf mv = ld(s);
#pragma GCC unroll 16
    for (int c = kW; c < kBlk; c += kW) mv = vmax(mv, ld(s + c));
    const float bm = hmax(mv);
    const float mx = bm > m[i] ? bm : m[i];
    const float ms = mx == NEG_INF ? 0.0f : mx;
    alpha[i] = fexp(m[i] - ms);
    for (int64_t j = 0; j < kBlk; ++j) s[j] = fexp(s[j] - ms);
    vf sv = ld(s);
#pragma GCC unroll 16
    for (int c = kW; c < kBlk; c += kW) sv += ld(s + c);
    l[i] = l[i] * alpha[i] + hsum(sv);
    m[i] = mx;
  }
}

static inline int64_t round_rows(int64_t n) { return (n + kR - 1) / kR * kR; }

// Lane j of the result = the sum of v[j]'s lanes, for kW vectors v (overwritten): log2(kW) stages, each adding
// the two halves of every lane block of a vector pair (i, i + n/2), so the reduction costs kW - 1 vector adds and
// twice as many shuffles instead of kW horizontal sums of kW - 1 dependent scalar adds each.
typedef int vi __attribute__((vector_size(4 * kW)));
constexpr int fold_lo(int w, int t) { return t % w < w / 2 ? t / w * w + t % w : kW + t / w * w + t % w - w / 2; }
constexpr int fold_hi(int w, int t) { return t % w < w / 2 ? t / w * w + w / 2 + t % w : kW + t / w * w + t % w; }
template <int W, int... I>
static inline vf fold_pair(vf a, vf b, std::integer_sequence<int, I...>) {
  return __builtin_shuffle(a, b, vi{fold_lo(W, I)...}) + __builtin_shuffle(a, b, vi{fold_hi(W, I)...});
}
template <int W = kW>
static inline vf sum_lanes(vf* v) {  // at the stage of lane blocks W there are W vectors left
  if constexpr (W == 1) {
    return v[0];
  } else {
#pragma GCC unroll 16
    for (int i = 0; i < W / 2; ++i) v[i] = fold_pair<W>(v[i], v[i + W / 2], std::make_integer_sequence<int, kW>{});
    return sum_lanes<W / 2>(v);
  }
}

// S[:, :nkeys] (rows×kBlk) = Q (rows×Dp) · Kᵀ for nkeys (a multiple of kW) key rows of K (row-major, ldk apart,
// Dp wide, fp32 or an input's dtype): dot products of a query with kW keys at a time, reduced together by
// sum_lanes, for a few query rows, where the transposed panel gemm_nt wants would cost more to build than it saves.
template <typename TK>
static inline void scores_by_dot(const float* Q, int64_t Dp, const TK* K, int64_t ldk, float* S, int64_t rows,
                                 int64_t nkeys) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* q = Q + i * Dp;
    for (int64_t j0 = 0; j0 < nkeys; j0 += kW) {
      const TK* k = K + j0 * ldk;
      vf acc[kW];
      const vf q0 = ld(q);
#pragma GCC unroll 16
      for (int j = 0; j < kW; ++j) acc[j] = q0 * ldx(k + j * ldk);
      for (int64_t d = kW; d < Dp; d += kW) {
        const vf qd = ld(q + d);
#pragma GCC unroll 16
        for (int j = 0; j < kW; ++j) acc[j] += qd * ldx(k + j * ldk + d);
      }
      st(S + i * kBlk + j0, sum_lanes(acc));
    }
  }
}

// Forward: one task per (query block, batch·head), the longest causal blocks first, straight from the (B, H, T, D)
// views: a task loads its Q block (scaled) and writes o (perturbation included) and lse (+inf on rows with no visible
// key) itself. Key blocks come from the packed panels p.kt / p.vp when tva_fwd made them (when several query blocks
// share each key block); otherwise rows with a unit head-dim stride and no head-dim padding are read in place, in
// their dtype, and other layouts are converted, block by block, into buffers of one block (in L1/L2): that costs
// less than a pass over the whole of K and V when a block is used once or twice (at decode, Tq 1 and Tk 4096,
// whole-cache copies in fresh pages cost ~20x the reference's time).
// At decode (a few query rows, scores by dot products) only the keys a block has are scored, rounded up to kW, and
// P·V stops at the block's last key, so a partial last block costs what its keys cost.
template <typename T>
void forward(const Ctx& c, const Packed& p, const TensorView& o, float* lse) {
  const int64_t BH = p.B * p.H, Dp = p.Dp, D = c.D, nmb = tva::cdiv(p.Tq, kBlk), ntask = BH * nmb;
  const int64_t sq = c.q.stride(3), sk = c.k.stride(3), sv = c.v.stride(3);
  // a few rows: scores by dot products with K's rows (never packed then: one query block), not a transposed panel
  const bool by_dot = p.Tq <= 4 && !p.kt;
  // rows with a unit head-dim stride and no head-dim padding are read in place, any block size. fp16/bf16 rows are
  // converted at each read: K's once per query row, V's once per register tile of rows, so in place only where
  // that is once (K at Tq 1, V by_dot); with more rows one conversion into a buffer costs less (fp16 prefill
  // at T 512 ran 2x slower with V read in place).
  constexpr bool f32 = std::is_same_v<T, float>;
  const bool k_direct = D == Dp && sk == 1 && by_dot && (f32 || p.Tq == 1);
  const bool v_direct = D == Dp && sv == 1 && (f32 || by_dot);
  // query rows a task can hold: a block, or fewer when Tq is smaller (decode: a register tile's kR rows), so a
  // small call does not clear whole-block buffers (clearing them was a quarter of a decode step's time)
  const int64_t qrows = std::min(kBlk, round_rows(p.Tq));
#pragma omp parallel
  {
    // zero-initialised: the head-dim padding (d >= D) is never written by the loads, and Q's rows past a partial
    // block keep finite values (zeros, or an earlier block's rows), so S's padding rows stay finite. The key and
    // value buffers are made (cleared) by the first block that is copied; Kt holds the last kW keys of a partial
    // block read in place.
    std::vector<float> Q(qrows * Dp, 0.0f), Kb, Kt, V, S(qrows * kBlk, 0.0f), acc(qrows * Dp);
    float m[kBlk], l[kBlk], alpha[kBlk];
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntask; ++t) {
      const int64_t mb = nmb - 1 - t / BH, bh = t % BH, b = bh / p.H, h = bh % p.H;
      const int64_t m0 = mb * kBlk, bm = std::min(kBlk, p.Tq - m0), mr = round_rows(bm);
      for (int64_t i = 0; i < bm; ++i) load_row(at4<T>(c.q, b, h, m0 + i, 0), sq, D, c.scale, &Q[i * Dp]);
      std::fill(acc.begin(), acc.begin() + mr * Dp, 0.0f);
      std::fill(m, m + mr, NEG_INF);
      std::fill(l, l + mr, 0.0f);
      const auto kb = tva::key_blocks(p.mask, m0, bm, kBlk);
      for (int64_t it = 0; it < kb.count(); ++it) {
        const int64_t n0 = kb.start(it, kBlk), nk = std::min(kBlk, p.Tk - n0);
        if (by_dot) {
          const int64_t nkr = std::min(kBlk, (nk + kW - 1) / kW * kW);  // keys scored
          if (k_direct) {
            const int64_t nin = nk / kW * kW;  // whole groups of kW keys in place; reads past Tk never
            scores_by_dot(Q.data(), Dp, at4<T>(c.k, b, h, n0, 0), c.k.stride(2), S.data(), bm, nin);
            if (nin < nk) {
              if (Kt.empty()) Kt.assign(kW * Dp, 0.0f);
              for (int64_t j = 0; j < kW; ++j) {
                if (nin + j < nk)
                  load_row(at4<T>(c.k, b, h, n0 + nin + j, 0), sk, D, 1.0f, &Kt[j * Dp]);
                else
                  std::fill(Kt.data() + j * Dp, Kt.data() + (j + 1) * Dp, 0.0f);
              }
              scores_by_dot(Q.data(), Dp, Kt.data(), Dp, S.data() + nin, bm, kW);
            }
          } else {
            if (Kb.empty()) Kb.assign(Dp * kBlk, 0.0f);
            for (int64_t j = 0; j < nk; ++j) load_row(at4<T>(c.k, b, h, n0 + j, 0), sk, D, 1.0f, &Kb[j * Dp]);
            // keys past Tk up to the group's end: 0 (never a stale inf or NaN) in the products, -inf from the bias
            std::fill(Kb.data() + nk * Dp, Kb.data() + nkr * Dp, 0.0f);
            scores_by_dot(Q.data(), Dp, Kb.data(), Dp, S.data(), bm, nkr);
          }
          for (int64_t i = 0; i < bm; ++i) std::fill(S.data() + i * kBlk + nkr, S.data() + (i + 1) * kBlk, 0.0f);
        } else {
          const float* Kp = nullptr;
          int64_t ldk = kBlk;  // transposed (Dp × kBlk)
          if (p.kt) {
            Kp = p.kt + bh * Dp * p.Tkp + n0;
            ldk = p.Tkp;
          } else {
            if (Kb.empty()) Kb.assign(Dp * kBlk, 0.0f);
            Kp = Kb.data();
            for (int64_t j = 0; j < nk; ++j) {
              const T* kr = at4<T>(c.k, b, h, n0 + j, 0);
              for (int64_t d = 0; d < D; ++d) Kb[d * kBlk + j] = load_f(kr + d * sk);
            }
            // keys past Tk: -inf from the key bias, but 0 (never a stale inf or NaN) in the products
            for (int64_t d = 0; d < D; ++d) std::fill(Kb.data() + d * kBlk + nk, Kb.data() + (d + 1) * kBlk, 0.0f);
          }
          gemm_nt(Q.data(), Dp, Kp, ldk, S.data(), mr, Dp);
        }
        // by_dot: only the bm real rows (gemm_nt computes whole kR-row tiles, so the rest keep its padding rows)
        const int64_t rows = by_dot ? bm : mr;
        mask_block(p, b, m0, n0, rows, false, S.data());
        softmax_step(S.data(), rows, m, l, alpha);
        // P·V over the block's nk keys (P is 0 past them)
        if (p.vp) {
          gemm_acc(S.data(), kBlk, p.vp + (bh * p.Tkp + n0) * Dp, Dp, acc.data(), Dp, rows, nk, Dp, alpha);
        } else if (v_direct) {
          gemm_acc(S.data(), kBlk, at4<T>(c.v, b, h, n0, 0), c.v.stride(2), acc.data(), Dp, rows, nk, Dp, alpha);
        } else {
          if (V.empty()) V.assign(kBlk * Dp, 0.0f);
          for (int64_t j = 0; j < nk; ++j) load_row(at4<T>(c.v, b, h, n0 + j, 0), sv, D, 1.0f, &V[j * Dp]);
          gemm_acc(S.data(), kBlk, V.data(), Dp, acc.data(), Dp, rows, nk, Dp, alpha);
        }
      }
      for (int64_t i = 0; i < bm; ++i) {
        store_output<T>(c, o, b, h, m0 + i, acc.data() + i * Dp, l[i] == 0.0f ? 0.0f : 1.0f / l[i]);
        lse[bh * p.Tq + m0 + i] = l[i] == 0.0f ? INFINITY : m[i] + std::log(l[i]);
      }
    }
  }
}

// P = exp(S - lse) on a masked block; lse per query (rows, or columns when transposed). +inf lse (no visible key,
// or a padding row past Tq) and -inf scores give 0.
static inline void probs(float* S, int64_t rows, const float* lse, bool transposed) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = S + r * kBlk;
    if (transposed) {
      for (int64_t c = 0; c < kBlk; ++c) s[c] = fexp(s[c] - lse[c]);
    } else {
      const float L = lse[r];
      for (int64_t c = 0; c < kBlk; ++c) s[c] = fexp(s[c] - L);
    }
  }
}

// dS = P ∘ (dP - Di), Di per query (rows, or columns when transposed)
static inline void dscores(const float* P, float* dP, int64_t rows, const float* di, bool transposed) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* pr = P + r * kBlk;
    float* g = dP + r * kBlk;
    if (transposed) {
      for (int64_t c = 0; c < kBlk; ++c) g[c] = pr[c] * (g[c] - di[c]);
    } else {
      const float D = di[r];
      for (int64_t c = 0; c < kBlk; ++c) g[c] = pr[c] * (g[c] - D);
    }
  }
}

// dK, dV of key block nb of batch·head bh over the query blocks that see it (scores transposed: keys as rows),
// written to the outputs through p.dk_out / p.dv_out; with dq given, also adds dS·K into its rows (dq: this
// batch·head's (Tqp, Dp), unscaled).
static inline void dkdv_block(const Packed& p, int64_t bh, int64_t nb, float* S, float* dP, float* dK, float* dV,
                              float* dq) {
  const int64_t Dp = p.Dp, b = bh / p.H;
  const int64_t n0 = nb * kBlk, bn = std::min(kBlk, p.Tk - n0), nr = round_rows(bn);
  std::fill(dK, dK + kBlk * Dp, 0.0f);
  std::fill(dV, dV + kBlk * Dp, 0.0f);
  const float* Kr = p.kp + (bh * p.Tkp + n0) * Dp;
  const float* Vr = p.vp + (bh * p.Tkp + n0) * Dp;
  int64_t i_lo, i_hi;
  tva::query_range(p.mask, n0, bn, &i_lo, &i_hi);
  for (int64_t m0 = (i_lo / kBlk) * kBlk; m0 < i_hi; m0 += kBlk) {
    gemm_nt(Kr, Dp, p.qt + bh * Dp * p.Tqp + m0, p.Tqp, S, nr, Dp);
    mask_block(p, b, m0, n0, nr, true, S);
    probs(S, nr, p.lse + bh * p.Tqp + m0, true);
    gemm_acc(S, kBlk, p.gp + (bh * p.Tqp + m0) * Dp, Dp, dV, Dp, nr, kBlk, Dp, nullptr);
    gemm_nt(Vr, Dp, p.gt + bh * Dp * p.Tqp + m0, p.Tqp, dP, nr, Dp);
    dscores(S, dP, nr, p.di + bh * p.Tqp + m0, true);
    gemm_acc(dP, kBlk, p.qp + (bh * p.Tqp + m0) * Dp, Dp, dK, Dp, nr, kBlk, Dp, nullptr);
    if (dq) gemm_acc_ta(dP, kBlk, Kr, Dp, dq + m0 * Dp, Dp, std::min(kBlk, p.Tqp - m0), nr, Dp);
  }
  p.dk_out(bh, n0, bn, dK, Dp, 1.0f);
  p.dv_out(bh, n0, bn, dV, Dp, 1.0f);
}

// Backward, FlashAttention-2 style, from the saved LSE, writing dq, dk, dv (dq and dk with the softmax scale
// applied) through p.dq_out / dk_out / dv_out, in the form tva_bwd chose (p.bwd_split). Fused: one task per
// batch·head walks its key blocks and accumulates dQ as it goes (5 block products per block pair). Split, finer
// work for fewer batch·heads than threads: dK, dV per key block, then dQ per query block recomputing P and dP
// (7 products; it also reads the transposed K and V panels).
void backward(const Packed& p) {
  const int64_t BH = p.B * p.H, Dp = p.Dp;
  const int64_t nnb = tva::cdiv(p.Tk, kBlk), nmb = tva::cdiv(p.Tq, kBlk);
  const bool fused = p.bwd_split == 0;
#pragma omp parallel
  {
    std::vector<float> S(kBlk * kBlk), dP(kBlk * kBlk), acc1(kBlk * Dp), acc2(kBlk * Dp);
    if (fused) {
      std::vector<float> dqb(p.Tqp * Dp);  // this task's batch·head's dQ, unscaled
#pragma omp for schedule(dynamic, 1)
      for (int64_t bh = 0; bh < BH; ++bh) {
        std::fill(dqb.begin(), dqb.end(), 0.0f);
        for (int64_t nb = 0; nb < nnb; ++nb)
          dkdv_block(p, bh, nb, S.data(), dP.data(), acc1.data(), acc2.data(), dqb.data());
        p.dq_out(bh, 0, p.Tq, dqb.data(), Dp, p.scale);
      }
    } else {
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < BH * nnb; ++t)
        dkdv_block(p, t % BH, t / BH, S.data(), dP.data(), acc1.data(), acc2.data(), nullptr);
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < BH * nmb; ++t) {
        const int64_t mb = nmb - 1 - t / BH, bh = t % BH, b = bh / p.H;
        const int64_t m0 = mb * kBlk, bm = std::min(kBlk, p.Tq - m0), mr = round_rows(bm);
        std::fill(acc1.begin(), acc1.end(), 0.0f);  // dQ
        const float* Qr = p.qp + (bh * p.Tqp + m0) * Dp;
        const float* Gr = p.gp + (bh * p.Tqp + m0) * Dp;
        const auto kb = tva::key_blocks(p.mask, m0, bm, kBlk);
        for (int64_t it = 0; it < kb.count(); ++it) {
          const int64_t n0 = kb.start(it, kBlk);
          gemm_nt(Qr, Dp, p.kt + bh * Dp * p.Tkp + n0, p.Tkp, S.data(), mr, Dp);
          mask_block(p, b, m0, n0, mr, false, S.data());
          probs(S.data(), mr, p.lse + bh * p.Tqp + m0, false);
          gemm_nt(Gr, Dp, p.vt + bh * Dp * p.Tkp + n0, p.Tkp, dP.data(), mr, Dp);
          dscores(S.data(), dP.data(), mr, p.di + bh * p.Tqp + m0, false);
          gemm_acc(dP.data(), kBlk, p.kp + (bh * p.Tkp + n0) * Dp, Dp, acc1.data(), Dp, mr, kBlk, Dp, nullptr);
        }
        p.dq_out(bh, m0, bm, acc1.data(), Dp, p.scale);
      }
    }
  }
}
