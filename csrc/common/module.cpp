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
#else
  m.attr("with_openmp") = false;
  m.def("max_threads", []() { return 1; });
#endif
  m.attr("compiler") = APT_VERSION_INFO;
  pybind11::list names;
  for (auto& fam : apt::op_families()) {
    fam.fn(m);
    names.append(fam.name);
  }
  m.attr("families") = names;
}
