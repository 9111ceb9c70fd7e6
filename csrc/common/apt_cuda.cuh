// CUDA-side helpers shared by the families' .cu files: error checks that throw (the pybind layer turns them
// into Python exceptions), the stream handed over from Python as an integer, a scoped device switch, and fp16/bf16
// load/store in fp32.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdexcept>
#include <string>
#include <cstdint>

#define APT_CUDA_CHECK(expr)                                                                        \
  do {                                                                                              \
    cudaError_t _e = (expr);                                                                        \
    if (_e != cudaSuccess)                                                                          \
      throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(_e) + " at " +     \
                               __FILE__ + ":" + std::to_string(__LINE__));                          \
  } while (0)

namespace apt {
namespace cuda {
inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Makes `device` current for the scope and restores the caller's device after (launches go to the current
// device's context; the stream passed from Python belongs to the tensors' device, which need not be current).
// A bare cudaSetDevice would leave torch's current device changed behind its back.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    APT_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) APT_CUDA_CHECK(cudaSetDevice(device));
    else prev_ = -1;
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
}  // namespace cuda
}  // namespace apt
