#!/usr/bin/env bash
# Compile-check the CUDA sources without a GPU and without a CUDA build of torch:
#   1. csrc/cuda/*.cu with nvcc for sm_80 and sm_90 (the kernels need only the CUDA headers);
#   2. csrc/cuda_ops.cpp (the ATen-facing CUDA ops) with the host compiler, -DAGF_WITH_CUDA,
#      against torch's headers (a CPU wheel ships the c10/cuda headers) and the CUDA headers.
# Linking needs libc10_cuda / libtorch_cuda, i.e. a CUDA build of torch: that part is left to the
# real build on a GPU machine (`pip install --no-build-isolation -e .`).
# Usage: csrc/check_cuda_compile.sh [python]   (python with torch installed; default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || { echo "check_cuda_compile: nvcc not found" >&2; exit 2; }
CUDA_HOME=${CUDA_HOME:-$("$PY" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')" 2>/dev/null)}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
CUDA_INC=$CUDA_HOME/include
[ -f "$CUDA_INC/cuda_runtime.h" ] || { echo "check_cuda_compile: no cuda_runtime.h under $CUDA_INC (set CUDA_HOME)" >&2; exit 2; }
mapfile -t TORCH_INC < <("$PY" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
# The flags torch's build adds to every nvcc call (no implicit half/bfloat16 conversions and
# operators, ...): code that needs one of those would compile here and fail in the real build.
mapfile -t TORCH_NVCC < <("$PY" -c "from torch.utils.cpp_extension import COMMON_NVCC_FLAGS; print('\n'.join(COMMON_NVCC_FLAGS))")
# The C++ standard torch's extension build uses (C++20 in recent torch, C++17 before).
STD=$("$PY" -c "import inspect, torch.utils.cpp_extension as c; print('c++20' if '-std=c++20' in inspect.getsource(c) else 'c++17')")
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

for cu in csrc/cuda/*.cu; do
  echo "nvcc  $cu"
  "$NVCC" "${TORCH_NVCC[@]}" -std="$STD" -O3 -Xcompiler -fPIC -DAGF_WITH_CUDA \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -c "$cu" -o "$OUT/$(basename "$cu").o"
done

INC=()
for d in "${TORCH_INC[@]}"; do INC+=(-I "$d"); done
for cpp in csrc/cuda_ops.cpp; do
  echo "c++   $cpp (AGF_WITH_CUDA)"
  # The CPU wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h; it only sets the shared-lib macro.
  ${CXX:-c++} -std="$STD" -O1 -fPIC -ffp-contract=off -DAGF_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
    -DTORCH_EXTENSION_NAME=_C "${INC[@]}" -I "$CUDA_INC" -c "$cpp" -o "$OUT/$(basename "$cpp").o"
done
echo "check_cuda_compile: OK (compiled; not linked)"
