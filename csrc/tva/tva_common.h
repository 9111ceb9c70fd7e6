// TVA attention (docs: shared/design/TVA.md, kernel contract): the mask rule and the key/query block ranges a
// fused kernel visits, shared by the CPU (tva_cpu.cpp) and CUDA (tva_cuda.cu) kernels. Query i of Tq sits at
// absolute position p = i + Tk - Tq; window == 0 means no window.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define APT_HD __host__ __device__ __forceinline__
#else
#define APT_HD inline
#endif

namespace apt {
namespace tva {

struct MaskSpec {
  int64_t Tq, Tk;
  int64_t window;  // 0 = none
  int64_t sinks;
  bool causal;
};

APT_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
APT_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
APT_HD int64_t cdiv(int64_t a, int64_t b) { return a <= 0 ? 0 : (a + b - 1) / b; }

// Query at absolute position p may see key j (padding is checked separately).
APT_HD bool visible(const MaskSpec& m, int64_t p, int64_t j) {
  if (m.causal && j > p) return false;
  if (m.window > 0 && j >= m.sinks) {
    int64_t d = p - j;
    if (m.causal ? !(d < m.window) : !(d < m.window && d > -m.window)) return false;
  }
  return true;
}

// Key blocks (of size bn) for the query rows [m0, m0 + bm): blocks [0, n_sink) hold sinks, then n_main blocks
// starting at key start2. Blocks wholly outside the causal/window band are never visited.
struct KeyBlocks {
  int64_t n_sink, start2, n_main;
  APT_HD int64_t count() const { return n_sink + n_main; }
  APT_HD int64_t start(int64_t it, int64_t bn) const { return it < n_sink ? it * bn : start2 + (it - n_sink) * bn; }
};

APT_HD KeyBlocks key_blocks(const MaskSpec& m, int64_t m0, int64_t bm, int64_t bn) {
  int64_t off = m.Tk - m.Tq;
  int64_t p_min = m0 + off, p_max = imin(m0 + bm, m.Tq) - 1 + off;
  int64_t hi = m.causal ? imin(m.Tk, p_max + 1) : m.Tk;
  int64_t lo = 0;
  if (m.window > 0) {
    lo = imax(0, p_min - m.window + 1);
    // non-causal: sinks past the window's right edge stay visible (the main run, which starts at or before them
    // whenever sinks > lo, reaches them)
    if (!m.causal) hi = imax(imin(m.Tk, p_max + m.window), imin(m.sinks, m.Tk));
  }
  int64_t sink_hi = imin(imin(m.sinks, lo), hi);
  KeyBlocks r;
  r.n_sink = cdiv(sink_hi, bn);
  r.start2 = imax((lo / bn) * bn, r.n_sink * bn);
  r.n_main = cdiv(hi - r.start2, bn);
  return r;
}

// Query rows [i_lo, i_hi) that can see some key in [n0, n0 + bn).
APT_HD void query_range(const MaskSpec& m, int64_t n0, int64_t bn, int64_t* i_lo, int64_t* i_hi) {
  int64_t off = m.Tk - m.Tq;
  int64_t n_max = imin(n0 + bn, m.Tk) - 1;
  int64_t p_lo = 0;
  if (m.causal) p_lo = n0;
  else if (m.window > 0) p_lo = n0 < m.sinks ? 0 : n0 - m.window + 1;  // a block holding sinks: every query
  int64_t p_hi = m.Tk;
  if (m.window > 0 && n0 >= m.sinks) p_hi = imin(m.Tk, n_max + m.window);
  *i_lo = imax(p_lo - off, 0);
  *i_hi = imin(p_hi - off, m.Tq);
}

}  // namespace tva
}  // namespace apt
