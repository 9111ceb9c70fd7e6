// CPU helpers shared by the kernel families that build their inner loops once per instruction set (scan, tva, moe):
// a vectorisable exp, the pick of the widest build the CPU runs (x86-64 generic, AVX2+FMA, AVX-512), and OpenMP's
// thread count.
// Everything here is inline and target-neutral, so the AVX2/AVX-512 builds inline it and vectorise it themselves.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#ifdef APT_WITH_OPENMP
#include <omp.h>
#endif

namespace apt {

// OpenMP's team size for the next parallel region and this thread's number in its team (1 and 0 without OpenMP)
inline int omp_threads() {
#ifdef APT_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
inline int omp_thread() {
#ifdef APT_WITH_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// exp for the inner loops: Cody-Waite range reduction + degree-6 polynomial (rel. error ~2e-7, fp32 rounding level)
// that the compiler vectorises, unlike a libm call. Below -87 the result is 0 (a mask on the bits; -inf and NaN
// minus inf give 0 too), from 88.03 (where the exponent reaches 128) it is inf, NaN stays NaN; +inf gives NaN, so
// callers that can meet it (sigmoid of -inf) take exp of a non-positive argument. Clamping x itself, or a float
// select, makes GCC branch (it folds exp of the bounds) and then refuse to vectorise the loop; integer clamps and
// masks do not.
static inline float fexp(float x) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, left in the low mantissa bits
  const float kshift = x * 1.44269504088896341f + shifter;
  const float kf = kshift - shifter;
  float r = x - kf * 0.693359375f;  // ln2 split in a high part exact in fp32 ...
  r = r - kf * -2.12194440e-4f;      // ... and the low remainder
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // In unsigned arithmetic: for x below -87 (masked off below) the subtraction wraps past INT32_MIN (x in
  // (-1.74e7, -8.7e6)) and k + 127 is negative, both undefined behaviour in int32_t.
  uint32_t kbits;
  std::memcpy(&kbits, &kshift, 4);
  int32_t k = static_cast<int32_t>(kbits - 0x4b400000u);  // the bits of the shifter; k >= -126 wherever the mask
  k = k > 128 ? 128 : k;                                   // below keeps the result
  const uint32_t bits = static_cast<uint32_t>(k + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  const float res = p * scale;
  int32_t rbits;
  std::memcpy(&rbits, &res, 4);
  rbits &= -static_cast<int32_t>(!(x < -87.0f));
  float out;
  std::memcpy(&out, &rbits, 4);
  return out;
}
static inline double fexp(double x) { return std::exp(x); }

// The kernel builds, narrowest first (avx2: AVX2 + FMA + F16C; avx512: F, VL, DQ, BW). The AVX2 and AVX-512
// builds exist where APT_CPU_ISA_BUILDS is defined (GCC on x86-64: the families compile them through
// `#pragma GCC target`); elsewhere only the generic one.
enum class CpuIsa { generic, avx2, avx512 };
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define APT_CPU_ISA_BUILDS 1
#endif

// The widest build this CPU runs, capped by the environment variable `cap_env` (generic|avx2|avx512, read on every
// call so tests can switch it).
inline CpuIsa best_cpu_isa(const char* cap_env) {
#ifdef APT_CPU_ISA_BUILDS
  static const CpuIsa cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                                    __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")
                                ? CpuIsa::avx512
                            : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                    __builtin_cpu_supports("f16c")  // every AVX2 CPU has it; TVA's fp16 loads use it
                                ? CpuIsa::avx2
                                : CpuIsa::generic;
  const char* cap = std::getenv(cap_env);
  const CpuIsa most = !cap ? CpuIsa::avx512 : std::strcmp(cap, "generic") == 0 ? CpuIsa::generic
                                            : std::strcmp(cap, "avx2") == 0   ? CpuIsa::avx2
                                                                              : CpuIsa::avx512;
  return std::min(cpu, most);
#else
  (void)cap_env;
  return CpuIsa::generic;
#endif
}

// The build's name as the APT_*_CPU_ISA variables spell it (what `apt info` shows).
inline const char* cpu_isa_name(CpuIsa isa) {
  return isa == CpuIsa::avx512 ? "avx512" : isa == CpuIsa::avx2 ? "avx2" : "generic";
}

}  // namespace apt
