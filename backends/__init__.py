"""Backend implementations of smoothce's cross-entropy, installed as ``smoothce.backends``.

``base`` is the contract and ``torch_defaults`` its plain-torch defaults; ``cpu`` is the CPU backend;
``cuda_triton`` and ``xpu_triton`` run the Triton kernels (``triton_common``, ``triton_kernels``,
``triton_shard_kernels``) through ``triton_backend``. Nothing here imports Triton at import time.
"""
