// The pybind11 module apt_kernels._C. It holds no kernels itself: each family registers its ops through
// APT_REGISTER_OPS, and this file reports how the module was built.
#include "common/apt_common.h"

#ifdef APT_WITH_OPENMP
#include <omp.h>
#endif

namespace apt {
std::vector<OpFamily>& op_families() {
  static std::vector<OpFamily> families;
  return families;
}
}  // namespace apt

// Another name only for the test build of tests/cuda_emu (the CUDA kernels emulated on the host).
#ifndef APT_MODULE_NAME
#define APT_MODULE_NAME _C
#endif

PYBIND11_MODULE(APT_MODULE_NAME, m) {
  m.doc() = "apt_kernels native kernels (CPU C++ always; CUDA when built with nvcc). No libtorch dependency.";
#ifdef APT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef APT_WITH_OPENMP
  m.attr("with_openmp") = true;
  m.def("max_threads", []() { return omp_get_max_threads(); });
  // The calling thread's team size for the kernels' parallel regions. Where this module's OpenMP runtime is not
  // torch's (another library name), torch.set_num_threads does not reach it: apt_kernels._native mirrors it here.
  m.def("set_num_threads", [](int n) {
    APT_CHECK(n >= 1, "set_num_threads: expected n >= 1, got ", n);
    omp_set_num_threads(n);
  }, pybind11::arg("n"));
#else
  m.attr("with_openmp") = false;
  m.def("max_threads", []() { return 1; });
  m.def("set_num_threads", [](int n) {  // one thread whatever n, but the same argument check as with OpenMP
    APT_CHECK(n >= 1, "set_num_threads: expected n >= 1, got ", n);
  }, pybind11::arg("n"));
#endif
  m.attr("compiler") = APT_VERSION_INFO;
  pybind11::list names;
  for (auto& fam : apt::op_families()) {
    fam.fn(m);
    names.append(fam.name);
  }
  m.attr("families") = names;
}
