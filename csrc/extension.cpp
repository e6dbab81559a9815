// Python entry point of autoguide_fast._C: build information and op registration.
//
// The fused ops themselves are registered with TORCH_LIBRARY in their own translation units;
// this file only tells Python what was compiled in.
#include <torch/extension.h>

#include <string>

#ifdef AGF_WITH_CUDA
std::string agf_cuda_runtime_version();  // csrc/cuda/build_info.cu
#endif

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
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "autoguide_fast compiled kernels";
  m.def("build_info", &build_info, "What this build of the extension contains.");
}
