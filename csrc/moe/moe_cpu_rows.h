// The row kernels of the MoE CPU gathers, included once per instruction-set build (moe_cpu.cpp). weighted_row_sum:
// o = Σ_j w_j · rows[j], m rows of C elements with element stride cs, accumulated in acc_t<T> (combine, dispatch's
// backward, and with m = 1 combine's backward); row_dot: combine's weight gradient.
// Rows are summed a chunk at a time, the first two in one pass, into an accumulator that stays in L1, instead of a
// zero-filled C-wide one read and written once per row and then copied out. Where the rows are in cache that
// bookkeeping was a third of the time (a synthetic gather, 2 threads: 4.6 -> 3.0 ms with SSE2, 2.3 with AVX2); at
// the router benchmark's N 4K, C 1024, E 8 the reads come from memory and combine gained ~10%.

template <typename T>
void weighted_row_sum(T* o, const T* const* rows, const acc_t<T>* ws, int m, int64_t C, int64_t cs) {
  using A = acc_t<T>;
  constexpr int64_t kChunk = 256;
  A acc[kChunk];
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, C - c0);
    int j = 0;
    if (m >= 2) {
      const T* r0 = rows[0] + c0 * cs;
      const T* r1 = rows[1] + c0 * cs;
      const A w0 = ws[0], w1 = ws[1];
      if (cs == 1) {
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) acc[c] = w0 * load_f(r0 + c) + w1 * load_f(r1 + c);
      } else {
        for (int64_t c = 0; c < n; ++c) acc[c] = w0 * load_f(r0 + c * cs) + w1 * load_f(r1 + c * cs);
      }
      j = 2;
    } else if (m == 1) {
      const T* r0 = rows[0] + c0 * cs;
      const A w0 = ws[0];
      if (cs == 1) {
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) acc[c] = w0 * load_f(r0 + c);
      } else {
        for (int64_t c = 0; c < n; ++c) acc[c] = w0 * load_f(r0 + c * cs);
      }
      j = 1;
    } else {
      for (int64_t c = 0; c < n; ++c) acc[c] = A(0);
    }
    for (; j < m; ++j) {
      const T* r = rows[j] + c0 * cs;
      const A wj = ws[j];
      if (cs == 1) {
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) acc[c] += wj * load_f(r + c);
      } else {
        for (int64_t c = 0; c < n; ++c) acc[c] += wj * load_f(r + c * cs);
      }
    }
    T* oc = o + c0;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) store_f(oc + c, acc[c]);
  }
}

// <a, b> over C elements with strides as, bs, in acc_t<T> (combine's weight gradient). The simd reduction lets the
// build split the sum across lanes: as a plain loop it was one serial add chain (no reassociation without it).
template <typename T>
acc_t<T> row_dot(const T* a, int64_t as, const T* b, int64_t bs, int64_t C) {
  acc_t<T> part = 0;
  if (as == 1 && bs == 1) {
#pragma omp simd reduction(+ : part)
    for (int64_t c = 0; c < C; ++c) part += load_f(a + c) * load_f(b + c);
  } else {
    for (int64_t c = 0; c < C; ++c) part += load_f(a + c * as) * load_f(b + c * bs);
  }
  return part;
}
