// CUDA part of the build information: the CUDA runtime version the extension was compiled with.
#include <cuda_runtime_api.h>

#include <string>

std::string agf_cuda_runtime_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}
