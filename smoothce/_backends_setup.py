"""Registers smoothce's own backends with the registry (Triton ones import Triton lazily)."""

from __future__ import annotations

import importlib

from smoothce import registry

# (module under smoothce.backends, class name); each module may be absent in a stripped install.
BUILTIN = (
    ("smoothce.backends.cpu", "CpuBackend"),
    ("smoothce.backends.cuda_triton", "CudaTritonBackend"),
    ("smoothce.backends.xpu_triton", "XpuTritonBackend"),
)


def register_builtin_backends() -> None:
    for module_name, class_name in BUILTIN:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue
            raise
        registry.register(getattr(module, class_name)())
