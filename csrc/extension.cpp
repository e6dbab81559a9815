// Python entry point of autoguide_fast._C: build information and op registration.
//
// The fused ops themselves are registered with TORCH_LIBRARY in their own translation units
// (cpu_ops.cpp, cuda_ops.cpp); this file only tells Python what was compiled in.
#include <torch/extension.h>

#include <string>

#ifdef AGF_WITH_CUDA
std::string agf_cuda_runtime_version();  // csrc/cuda/build_info.cu
#endif

namespace agf {
std::string cpu_kernels_isa();                    // csrc/cpu_ops.cpp
bool set_cpu_kernels_isa(const std::string& isa);  // csrc/cpu_ops.cpp
}  // namespace agf

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = std::string(TORCH_VERSION);
#ifdef AGF_WITH_CUDA
  info["cuda"] = true;
  info["cuda_runtime"] = agf_cuda_runtime_version();
#else
  info["cuda"] = false;
  info["cuda_runtime"] = std::string("");
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["cpu_kernels"] = agf::cpu_kernels_isa();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "autoguide_fast compiled kernels";
  m.def("build_info", &build_info, "What this build of the extension contains.");
  m.def("set_cpu_kernels", &agf::set_cpu_kernels_isa, pybind11::arg("isa"),
        "Select the CPU kernel variant ('avx2+fma' or 'baseline'); False if unavailable here.");
}
