"""Build of autoguide_fast and its compiled extension ``autoguide_fast._C`` (from csrc/).

Environment switches:
  AUTOGUIDE_FAST_BUILD_EXT=0   build no extension at all (pure Python install).
  AUTOGUIDE_FAST_CUDA=auto     (default) compile csrc/cuda when a CUDA toolkit and a CUDA build
                               of torch are present; =0 never; =1 always (fails if impossible).
  TORCH_CUDA_ARCH_LIST         honoured by torch's build helpers (e.g. "9.0" for H100/H200). When
                               unset: the visible GPUs' architectures (torch's default), or with
                               no visible GPU "8.0;9.0+PTX" (A100, H100/H200, and PTX that newer
                               cards compile when they load it).
  CUDA_HOME                    the CUDA toolkit root; when unset and the nvcc on the PATH is a
                               wrapper outside a toolkit, a toolkit root is looked for (see
                               _cuda_home_fallback) instead of torch's guess.
"""

import glob
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _has_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def _cuda_home_fallback(torch_cuda):
    """A CUDA toolkit root for torch's build helpers when their own guess would be wrong.

    Without CUDA_HOME/CUDA_PATH, torch takes the parent of the directory of the first `nvcc` on
    the PATH; when that nvcc is a wrapper or a link outside the toolkit (e.g. /usr/local/bin/nvcc)
    the guess has no headers and the CUDA build fails. Then prefer the wrapper's real target, the
    usual /usr/local/cuda, and toolkits whose major version is torch's. None = leave torch's guess.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or not torch_cuda:
        return None
    nvcc = shutil.which("nvcc")
    if nvcc is None or _has_toolkit(os.path.dirname(os.path.dirname(nvcc))):
        return None
    major = torch_cuda.split(".")[0]
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    candidates += sorted(glob.glob(f"/usr/local/cuda-{major}.*"), reverse=True)
    return next((c for c in candidates if _has_toolkit(c)), None)


def _extensions():
    if os.environ.get("AUTOGUIDE_FAST_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
    except ImportError as exc:  # e.g. a plain `pip install .`: its isolated build has no torch.
        raise RuntimeError(
            "autoguide_fast's extension is compiled against the installed torch, and torch is not "
            "importable here. Install torch first, then `pip install --no-build-isolation .` (a plain "
            "`pip install .` builds in an isolated environment without it); AUTOGUIDE_FAST_BUILD_EXT=0 "
            "installs without the extension."
        ) from exc

    cuda_home = _cuda_home_fallback(torch.version.cuda)
    if cuda_home is not None:  # Before torch's build helpers read it (at their import).
        print(f"autoguide_fast: CUDA_HOME not set and the nvcc on the PATH is outside a toolkit; using {cuda_home}")
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cuda_flag = os.environ.get("AUTOGUIDE_FAST_CUDA", "auto")
    if cuda_flag not in ("auto", "0", "1"):
        raise RuntimeError(f"AUTOGUIDE_FAST_CUDA must be auto, 0 or 1, got {cuda_flag!r}")
    cuda_possible = CUDA_HOME is not None and torch.version.cuda is not None
    if cuda_flag == "1" and not cuda_possible:
        raise RuntimeError(
            "AUTOGUIDE_FAST_CUDA=1 but CUDA cannot be built: "
            f"CUDA_HOME={CUDA_HOME}, torch.version.cuda={torch.version.cuda}"
        )
    with_cuda = cuda_possible and cuda_flag != "0"

    # Relative paths (setuptools requires them), so setup.py runs from its own directory (as pip does).
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources or not os.path.isfile(os.path.join("csrc", "cpu_kernels.h")):
        raise RuntimeError(f"the extension's sources (csrc/*.cpp and headers) are not in {os.getcwd()}; "
                           f"run setup.py from its own directory ({ROOT})")
    # No implicit fma contraction and no fast-math: the CPU kernels reproduce the reference's
    # separately rounded float operations bit for bit. No errno from math functions: sqrt is then
    # one instruction, and the noise loops vectorise.
    # The C++ standard is left to torch's build helpers (C++17 or C++20 depending on the torch).
    cxx_flags = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno"]
    if os.name != "nt":
        cxx_flags += ["-fopenmp"]
    extra_link = ["-fopenmp"] if os.name != "nt" else []
    if with_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            # torch's own default with no visible GPU is every architecture of its CUDA version (a
            # long build); without PTX, a card newer than the list would find no kernel to run.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        if not cuda_sources:  # The C++ ops would then refer to kernels that were never compiled.
            raise RuntimeError("a CUDA build of the extension needs csrc/cuda/*.cu, found none")
        sources = cpp_sources + cuda_sources
        ext = CUDAExtension(
            "autoguide_fast._C",
            sources,
            define_macros=[("AGF_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=extra_link,
        )
    else:
        ext = CppExtension("autoguide_fast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=extra_link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="autoguide_fast",
    version="0.1.0",
    description="Fast autoguidance sampling for diffusion models: fused kernels, CUDA streams and graphs",
    long_description=Path(ROOT, "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["autoguide_fast", "autoguide_fast.*"]),
    package_data={"autoguide_fast": ["toy/weights/*.pt", "py.typed"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "triton": ["triton>=3.3"],
        "cli": ["tqdm", "matplotlib", "Pillow"],
        "test": ["pytest", "pytest-benchmark", "tqdm", "matplotlib", "Pillow"],
    },
    entry_points={"console_scripts": ["autoguide-fast = autoguide_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
