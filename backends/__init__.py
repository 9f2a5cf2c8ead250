"""Backend implementations of smoothce's cross-entropy, installed as ``smoothce.backends``.

Each module serves one backend: ``cpu`` (vectorized torch), ``cuda_triton`` and
``xpu_triton`` (the Triton kernels of ``triton_kernels``). ``base`` defines the
interface they share. Nothing here imports Triton at import time.
"""
