"""The backend registry: which Backend computes smoothce's cross-entropy for a device.

Backends are registered per torch device type. ``select(device)`` returns the one
in use: the ``SMOOTHCE_BACKEND`` environment variable, when set, names a backend
that serves CPU tensors (how the Triton kernels run on CPU under
``TRITON_INTERPRET=1``) and the tensors of its own device type; otherwise the
device type's default. Other packages add backends through the entry-point group
``smoothce.backends`` (each entry point loads to a Backend, or to a callable that
returns one) or by calling ``register`` directly. ``default_device()`` is the device
smoothce's tools use when none is named.
"""

from __future__ import annotations

import os
import threading
from importlib import metadata

import torch

from smoothce.backends.base import Backend

ENV_VAR = "SMOOTHCE_BACKEND"
ENTRY_POINT_GROUP = "smoothce.backends"
ACCELERATORS = ("cuda", "xpu")  # the GPU device types of smoothce's own backends, in order of preference

_by_name: dict[str, Backend] = {}
_default_for: dict[str, str] = {}
_entry_points_loaded = False
_lock = threading.RLock()


def register(backend: Backend, *, default: bool = True) -> Backend:
    """Add ``backend``; with ``default`` it becomes the choice for its device type.

    Returns the backend, so a module can write ``register(MyBackend())``.
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"expected a smoothce.backends.base.Backend, got {type(backend).__name__}")
    if not backend.name or not backend.device_type:
        raise ValueError(f"backend {backend!r} needs a non-empty name and device_type")
    with _lock:
        known = _by_name.get(backend.name)
        if known is not None and type(known) is not type(backend):
            raise ValueError(f"a different backend is already registered as {backend.name!r}: {known!r}")
        _by_name[backend.name] = backend
        if default or backend.device_type not in _default_for:
            _default_for[backend.device_type] = backend.name
    return backend


def _load_entry_points() -> None:
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            obj = entry.load()
            backend = obj if isinstance(obj, Backend) else obj()
            if backend.name not in _by_name:
                register(backend, default=False)


def backends() -> dict[str, Backend]:
    """All registered backends by name (entry points included)."""
    _load_entry_points()
    return dict(_by_name)


def get(name: str) -> Backend:
    """The backend called ``name``; a ValueError listing the known names if there is none."""
    _load_entry_points()
    try:
        return _by_name[name]
    except KeyError:
        known = ", ".join(sorted(_by_name)) or "none"
        raise ValueError(f"unknown smoothce backend {name!r}: known backends are {known}") from None


def select(device: str | torch.device) -> Backend:
    """The backend that computes the loss for tensors on ``device``.

    ``SMOOTHCE_BACKEND=<name>`` overrides the default for CPU tensors and for
    the named backend's own device type. Raises ValueError for an unknown name or a
    device type with no backend, RuntimeError when the chosen backend cannot run.
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if not _entry_points_loaded:  # on every call of the op: skip the lock once they are in
        _load_entry_points()
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced:
        backend = get(forced)
        if device_type not in ("cpu", backend.device_type):
            backend = None
    else:
        backend = None
    if backend is None:
        name = _default_for.get(device_type)
        if name is None:
            served = ", ".join(sorted(_default_for)) or "none"
            raise ValueError(f"smoothce has no backend for {device_type!r} tensors: backends serve {served}")
        backend = _by_name[name]
    reason = backend.unavailable_reason(device_type)
    if reason is not None:
        raise RuntimeError(f"smoothce backend {backend.name!r} cannot run on {device_type!r} tensors: {reason}")
    return backend


def default_device() -> torch.device:
    """The first accelerator present (CUDA, then XPU, at its current index), else the CPU."""
    for device_type in ACCELERATORS:
        module = getattr(torch, device_type, None)
        if module is not None and module.is_available():
            return torch.device(device_type, module.current_device())
    return torch.device("cpu")
