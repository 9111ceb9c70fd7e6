// Warp-level tensor-core matrix multiply (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate; sm_80+) and the
// register fragments it works on, for kernels that keep their tiles in registers (tva_cuda_tc.cu).
//
// Fragment layouts (PTX ISA, "matrix fragments for mma.m16n8k16"), lane = 4·g + t (g = lane / 4, t = lane % 4),
// each 32-bit register holding two 16-bit elements, the lower-indexed one in the low half:
//   A (16×16, row major) a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]
//                        a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   B (16×8, k × n)      b[0] = B[2t, 2t+1][g]      b[1] = B[2t+8, 2t+9][g]
//   C (16×8, fp32)       c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// So the C fragments of two adjacent 8-column tiles, rounded to 16 bits, are the A fragment of a 16-wide k step:
// softmax probabilities computed in registers feed the next product without a trip through shared memory.
//
// Under tests/cuda_emu (APT_CUDA_EMU) the emulator computes the product (and ldmatrix's loads) from every lane's
// registers (addresses) with the layouts above, and fails the launch unless the whole warp reaches the same one.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/apt_cuda.cuh"

namespace apt {
namespace cuda {

template <typename T>
__device__ __forceinline__ uint32_t bits16(T v) {
  static_assert(sizeof(T) == 2, "16-bit element types only");
  uint16_t u;
  memcpy(&u, &v, 2);
  return u;
}

// fp32 pair -> one register of two T (fp16/bf16), lo in the low half
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return bits16(from_f<T>(lo)) | (bits16(from_f<T>(hi)) << 16);
}

// two consecutive 16-bit elements of shared memory (p 4-byte aligned) as one register
__device__ __forceinline__ uint32_t ld_pair(const uint16_t* p) {
#if defined(APT_CUDA_EMU)
  uint32_t u;
  memcpy(&u, p, 4);
  return u;
#else
  return *reinterpret_cast<const uint32_t*>(p);
#endif
}

// p[0] and p[stride] as one register: a B fragment read down a column of a row-major tile
__device__ __forceinline__ uint32_t ld_pair_strided(const uint16_t* p, int stride) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[stride]) << 16);
}

// ldmatrix .x4: four 8×8 matrices of 16-bit elements from shared memory, each row 16 contiguous, aligned bytes.
// Lane l gives the address of row l % 8 of matrix l / 8; register j of lane l receives matrix j's
//   plain: row l / 4, columns 2(l % 4) and 2(l % 4) + 1   (an A fragment's or a row-major [n][k] B's layout)
//   trans: column l / 4, rows 2(l % 4) and 2(l % 4) + 1   (a B fragment read from a row-major [k][n] tile)
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint16_t* row) {
#if defined(APT_CUDA_EMU)
  ::apt_emu::ldmatrix_x4(r, row, false);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const uint16_t* row) {
#if defined(APT_CUDA_EMU)
  ::apt_emu::ldmatrix_x4(r, row, true);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// cp.async (sm_80+): 16 bytes global -> shared without a register round trip, so a tile's load overlaps the math
// on the previous one; a thread's copies are grouped by commit, and wait<N> returns once at most N of its groups
// are in flight (the others' data then needs a __syncthreads before other threads read it). Both addresses 16-byte
// aligned.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(APT_CUDA_EMU)
  ::apt_emu::cp_async16(smem, gmem);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(APT_CUDA_EMU)
  ::apt_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(APT_CUDA_EMU)
  ::apt_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// d += A·B for one 16×8×16 tile; T = __half or __nv_bfloat16 (the element type of a and b)
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "fp16/bf16 only");
#if defined(APT_CUDA_EMU)
  ::apt_emu::mma_16816(std::is_same<T, __nv_bfloat16>::value, d, a, b);
#else
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

}  // namespace cuda
}  // namespace apt
