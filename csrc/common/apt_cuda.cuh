// CUDA-side helpers shared by the families' .cu files: error checks that throw (the pybind layer turns them
// into Python exceptions), the stream handed over from Python as an integer, a scoped device switch, and fp16/bf16
// load/store in fp32.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

// The block's dynamic shared memory as a T array (a macro so that tests/cuda_emu can give it a host definition).
#ifndef APT_DYNAMIC_SMEM
#define APT_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

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

// Lets `kernel` launch with `bytes` of dynamic shared memory on `device`: the opt-in attribute is raised once per
// (kernel, device) to the largest size asked so far, and the kernel's static size and the device's limit are read
// once, since these driver calls cost microseconds on every launch otherwise. Throws std::invalid_argument
// (ValueError in Python) with describe() + the sizes when the device cannot give that much.
struct SmemOptIn {
  size_t static_bytes = 0, granted = 0;
  int optin = -1;  // -1: not read yet
};
// One table for the whole module (an inline function's statics are unique), whatever the call site: two launchers
// of one kernel must agree on what was granted.
inline std::mutex& smem_opt_in_mutex() {
  static std::mutex mu;
  return mu;
}
inline SmemOptIn& smem_opt_in(const void* kernel, int device) {
  static std::map<std::pair<const void*, int>, SmemOptIn> states;
  return states[{kernel, device}];
}

template <typename K, typename F>
void ensure_dynamic_smem(K* kernel, int device, size_t bytes, F&& describe) {
  std::lock_guard<std::mutex> lock(smem_opt_in_mutex());
  SmemOptIn& st = smem_opt_in(reinterpret_cast<const void*>(kernel), device);
  if (st.optin < 0) {
    cudaFuncAttributes attr{};
    APT_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    int optin = 0;
    APT_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    st.static_bytes = attr.sharedSizeBytes;
    st.optin = optin;
  }
  if (bytes + st.static_bytes > static_cast<size_t>(st.optin))
    throw std::invalid_argument(describe() + " needs " + std::to_string(bytes + st.static_bytes) +
                                " bytes of shared memory per block, the device allows " + std::to_string(st.optin));
  if (bytes > st.granted) {
    APT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    st.granted = bytes;
  }
}

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
}  // namespace cuda
}  // namespace apt
