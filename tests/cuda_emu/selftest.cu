// Kernels with the bugs the emulator must report (tests/test_cuda_emu.py::test_emulator_catches_*), bound as family
// "cuda_emu_selftest" of the emulated module only: a test of the kernels that could not fail would prove nothing.
#include "common/apt_common.h"
#include "common/apt_cuda.cuh"
#include "common/apt_mma.cuh"

namespace {

// out[i] = sum of in over the block, through shared memory; `sync` false drops the barrier between the writes
// and the reads (a race: the result depends on thread order).
__global__ void block_sum_kernel(const float* in, float* out, bool sync) {
  __shared__ float s[256];
  s[threadIdx.x] = in[threadIdx.x];
  if (sync) __syncthreads();
  float acc = 0.f;
  for (unsigned i = 0; i < blockDim.x; ++i) acc += s[i];
  out[threadIdx.x] = acc;
}

// __syncthreads inside a branch only the first half of the block takes
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < blockDim.x / 2) __syncthreads();
  out[threadIdx.x] = 1.f;
}

// a warp reduction after the lanes past `live` have returned
__global__ void shuffle_after_exit_kernel(float* out, unsigned live) {
  if (threadIdx.x >= live) return;
  float v = 1.f;
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

// reads dynamic shared memory nobody wrote
__global__ void uninitialised_smem_kernel(float* out) {
  APT_DYNAMIC_SMEM(float, s);
  out[threadIdx.x] = s[threadIdx.x];
}

// two 32 KB static arrays: 64 KB of static shared memory, past the 48 KB a kernel may declare. Whichever thread
// runs first writes b's first 64 bytes (the ASan build's first redzone, were b's stand-in left poisoned).
__global__ void big_static_kernel(float* out) {
  __shared__ float a[8192];
  __shared__ float b[8192];
  a[threadIdx.x] = 1.f;
  b[threadIdx.x % 16] = 2.f;
  __syncthreads();
  out[threadIdx.x] = a[threadIdx.x] + b[threadIdx.x];
}

// declared for at most 64 threads per block
__global__ void __launch_bounds__(64) bounded_kernel(float* out) { out[threadIdx.x] = 1.f; }

// Tensor-core primitives (apt_mma.cuh) against a matmul: C = A·B + 1 and C2 = A·Btᵀ + 1 (16×16, fp32) from
// row-major 16-bit A, B (k × n) and Bt (n × k), staged in shared memory and read with ldmatrix (A and Bt plain, B
// transposed) into mma fragments. Lanes past `live` return first (undefined on a GPU; the emulator reports it).
struct alignas(16) MmaTiles {
  uint16_t a[16][24], b[16][24], bt[16][24];  // rows padded to 48 bytes: each row start 16-byte aligned
};

__global__ void mma_tile_kernel(const uint16_t* A, const uint16_t* B, const uint16_t* Bt, float* C, float* C2, bool bf16,
                                unsigned live) {
  __shared__ MmaTiles sm;
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  for (int i = lane; i < 256; i += 32) {
    sm.a[i / 16][i % 16] = A[i];
    sm.b[i / 16][i % 16] = B[i];
    sm.bt[i / 16][i % 16] = Bt[i];
  }
  __syncthreads();
  if (static_cast<unsigned>(lane) >= live) return;
  uint32_t a[4], b[4], bt[4];
  apt::cuda::ldsm_x4(a, &sm.a[(lane % 8) + 8 * ((lane / 8) % 2)][8 * (lane / 16)]);
  apt::cuda::ldsm_x4_trans(b, &sm.b[(lane % 8) + 8 * ((lane / 8) % 2)][8 * (lane / 16)]);
  apt::cuda::ldsm_x4(bt, &sm.bt[(lane % 8) + 8 * (lane / 16)][8 * ((lane / 8) % 2)]);
  float d[2][2][4];
  for (auto& x : d)
    for (auto& y : x)
      for (float& z : y) z = 1.f;  // d += A·B
  for (int n = 0; n < 2; ++n) {
    const uint32_t bn[2] = {b[2 * n], b[2 * n + 1]}, btn[2] = {bt[2 * n], bt[2 * n + 1]};
    if (bf16) {
      apt::cuda::mma_16816<__nv_bfloat16>(d[0][n], a, bn);
      apt::cuda::mma_16816<__nv_bfloat16>(d[1][n], a, btn);
    } else {
      apt::cuda::mma_16816<__half>(d[0][n], a, bn);
      apt::cuda::mma_16816<__half>(d[1][n], a, btn);
    }
  }
  for (int w = 0; w < 2; ++w) {
    float* out = w == 0 ? C : C2;
    for (int n = 0; n < 2; ++n)
      for (int e = 0; e < 4; ++e) out[(g + 8 * (e / 2)) * 16 + 8 * n + 2 * t + e % 2] = d[w][n][e];
  }
}

float* fptr(const pybind11::object& t) { return apt::TensorView::from(t, "t").ptr<float>(); }

}  // namespace

APT_REGISTER_OPS(cuda_emu_selftest) {
  m.def("emu_block_sum", [](pybind11::object in, pybind11::object out, int threads, bool sync) {
    block_sum_kernel<<<1, threads>>>(fptr(in), fptr(out), sync);
    APT_CUDA_CHECK(cudaGetLastError());
  });
  m.def("emu_divergent_barrier", [](pybind11::object out, int threads) {
    divergent_barrier_kernel<<<1, threads>>>(fptr(out));
    APT_CUDA_CHECK(cudaGetLastError());
  });
  m.def("emu_shuffle_after_exit", [](pybind11::object out, unsigned live) {
    shuffle_after_exit_kernel<<<1, 32>>>(fptr(out), live);
    APT_CUDA_CHECK(cudaGetLastError());
  });
  m.def("emu_uninitialised_smem", [](pybind11::object out) {
    uninitialised_smem_kernel<<<1, 32, 32 * sizeof(float)>>>(fptr(out));
    APT_CUDA_CHECK(cudaGetLastError());
  });
  m.def("emu_big_static", [](pybind11::object out) {
    big_static_kernel<<<1, 32>>>(fptr(out));
    APT_CUDA_CHECK(cudaGetLastError());
  });
  m.def("emu_bounded", [](pybind11::object out, unsigned threads) {
    bounded_kernel<<<1, threads>>>(fptr(out));
    APT_CUDA_CHECK(cudaGetLastError());
  });
  m.def("emu_mma_tile", [](pybind11::object a, pybind11::object b, pybind11::object bt, pybind11::object c,
                           pybind11::object c2, bool bf16, unsigned live) {
    auto u16 = [](const pybind11::object& t) { return apt::TensorView::from(t, "t").ptr<const uint16_t>(); };
    mma_tile_kernel<<<1, 32>>>(u16(a), u16(b), u16(bt), fptr(c), fptr(c2), bf16, live);
    APT_CUDA_CHECK(cudaGetLastError());
  });
  m.def("emu_launch", [](pybind11::object out, unsigned grid, unsigned threads, size_t smem) {
    uninitialised_smem_kernel<<<grid, threads, smem>>>(fptr(out));
    APT_CUDA_CHECK(cudaGetLastError());
  });
}
