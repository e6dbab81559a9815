"""A CPU stand-in for one CUDA device, so the GPU tests' logic and the engine's CUDA-only code paths
(streams, graph capture and replay, the capture fallback, the random fence, the cache route) run on a
machine without a GPU: ``python -m pytest -p tests.gpu_emulation.plugin -m gpu tests/test_engine_gpu.py``.

Stream ordering is checked, not run (``stream_order``): every access records its stream, and one
that a GPU would not order after a conflicting access of another stream raises ``StreamRace``, as
does a capture that leaves a fork unjoined or launches outside its streams.

It checks logic, not the GPU: timings, real stream concurrency, cuBLAS/cuDNN bit-exactness, the
CUDA C++ kernels (served by the C++ CPU kernels under the name "cuda") and compiled Triton (run by
its interpreter) are out of its reach. ``tests/test_gpu_emulation.py`` runs it in the CPU suite.
Made for a CPU build of torch: with a CUDA build on a machine without a GPU, ``torch.compile``
still asks the real CUDA runtime about the device (that test is left out there).
"""
