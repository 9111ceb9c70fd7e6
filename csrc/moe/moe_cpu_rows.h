// The weighted row sum under MoE combine and dispatch's backward: o = Σ_j w_j · rows[j], m rows of C elements
// with element stride cs, accumulated in acc_t<T>. Included once per instruction-set build (moe_cpu.cpp).
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
