"""The fused sampler ops of the compiled extension, declared once with ``torch.library``.

The schemas and the CPU/CUDA kernels live in ``csrc/`` (``TORCH_LIBRARY(autoguide_fast, ...)``);
their fake implementations (for ``torch.compile`` and ``torch.library.opcheck``) and typed Python
wrappers live in :mod:`autoguide_fast.ops.extension_ops`, which imports only when the extension
loaded. :mod:`autoguide_fast.ops.fused_backend` is the step backend shared by "cpp" and "cuda".
"""
