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

// declared for at most 64 threads per block
__global__ void __launch_bounds__(64) bounded_kernel(float* out) { out[threadIdx.x] = 1.f; }

// C (16×8, fp32) = A (16×16) · B (16×8), row-major 16-bit inputs, one mma.sync with the fragments read as
// apt_mma.cuh documents; the lanes past `live` return first (the hardware's undefined case the emulator reports)
__global__ void mma_tile_kernel(const uint16_t* A, const uint16_t* B, float* C, bool bf16, unsigned live) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  if (static_cast<unsigned>(lane) >= live) return;
  using apt::cuda::ld_pair_strided;
  const uint32_t a[4] = {ld_pair_strided(&A[g * 16 + 2 * t], 1), ld_pair_strided(&A[(g + 8) * 16 + 2 * t], 1),
                         ld_pair_strided(&A[g * 16 + 2 * t + 8], 1), ld_pair_strided(&A[(g + 8) * 16 + 2 * t + 8], 1)};
  const uint32_t b[2] = {ld_pair_strided(&B[2 * t * 8 + g], 8), ld_pair_strided(&B[(2 * t + 8) * 8 + g], 8)};
  float d[4] = {1.f, 1.f, 1.f, 1.f};  // C starts at 1: d += A·B
  if (bf16) apt::cuda::mma_16816<__nv_bfloat16>(d, a, b);
  else apt::cuda::mma_16816<__half>(d, a, b);
  C[g * 8 + 2 * t] = d[0];
  C[g * 8 + 2 * t + 1] = d[1];
  C[(g + 8) * 8 + 2 * t] = d[2];
  C[(g + 8) * 8 + 2 * t + 1] = d[3];
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
  m.def("emu_bounded", [](pybind11::object out, unsigned threads) {
    bounded_kernel<<<1, threads>>>(fptr(out));
    APT_CUDA_CHECK(cudaGetLastError());
  });
  m.def("emu_mma_tile", [](pybind11::object a, pybind11::object b, pybind11::object c, bool bf16, unsigned live) {
    auto u16 = [](const pybind11::object& t) { return apt::TensorView::from(t, "t").ptr<const uint16_t>(); };
    mma_tile_kernel<<<1, 32>>>(u16(a), u16(b), fptr(c), bf16, live);
    APT_CUDA_CHECK(cudaGetLastError());
  });
  m.def("emu_launch", [](pybind11::object out, unsigned grid, unsigned threads, size_t smem) {
    uninitialised_smem_kernel<<<grid, threads, smem>>>(fptr(out));
    APT_CUDA_CHECK(cudaGetLastError());
  });
}
