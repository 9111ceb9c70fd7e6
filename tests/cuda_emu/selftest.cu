// Kernels with the bugs the emulator must report (tests/test_cuda_emu.py::test_emulator_catches_*), bound as family
// "cuda_emu_selftest" of the emulated module only: a test of the kernels that could not fail would prove nothing.
#include "common/apt_common.h"
#include "common/apt_cuda.cuh"

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
  m.def("emu_launch", [](pybind11::object out, unsigned grid, unsigned threads, size_t smem) {
    uninitialised_smem_kernel<<<grid, threads, smem>>>(fptr(out));
    APT_CUDA_CHECK(cudaGetLastError());
  });
}
