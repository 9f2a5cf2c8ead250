"""Where and with what a benchmark ran: device, machine, versions, date, smoothce's backend.

Also picks the default device (CUDA, then XPU, then CPU) and names the results folder
after it ("cpu", "cuda-NVIDIA-H100-80GB-HBM3", ...).
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch

ACCELERATORS = ("cuda", "xpu")
# Distributions whose versions are recorded when installed.
PACKAGES = ("torch", "triton", "smoothce", "numpy", "liger-kernel", "flash-attn", "quack-kernels")


def default_device() -> torch.device:
    """The first accelerator present (CUDA, then XPU), else the CPU."""
    for device_type in ACCELERATORS:
        module = getattr(torch, device_type, None)
        if module is not None and module.is_available():
            return torch.device(device_type, module.current_device())
    return torch.device("cpu")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return cpu_model()
    return getattr(torch, device.type).get_device_name(device)


def device_kind(device: torch.device) -> str:
    """A folder name for the device: "cpu", or the type and card name, e.g. "cuda-NVIDIA-H100"."""
    if device.type == "cpu":
        return "cpu"
    name = re.sub(r"[^A-Za-z0-9.]+", "-", device_name(device)).strip("-")
    return f"{device.type}-{name}"


def total_memory_bytes(device: torch.device) -> int | None:
    if device.type != "cpu":
        return getattr(torch, device.type).get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors now: MemAvailable on CPU, ``mem_get_info`` on accelerators."""
    if device.type != "cpu":
        module = getattr(torch, device.type)
        if hasattr(module, "mem_get_info"):
            return module.mem_get_info(device)[0]
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _commit() -> str | None:
    """The smoothce checkout's commit (with "+dirty" when it has local changes), if it is one."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            # --no-optional-locks: read only, status must not refresh the index.
            ["git", "--no-optional-locks", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def load_average() -> float | None:
    """The 1-minute load average (None where the system has none): how busy the machine was."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def describe(device: torch.device) -> dict:
    """The record written with every result."""
    from smoothce import registry

    try:
        backend = registry.select(device).name
    except (ValueError, RuntimeError) as error:
        backend = f"unavailable ({error})"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "device_type": device.type,
        "device_name": device_name(device),
        "device_memory_bytes": total_memory_bytes(device),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": _versions(),
        "smoothce_backend": backend,
        "smoothce_backend_env": os.environ.get("SMOOTHCE_BACKEND") or None,
        "commit": _commit(),
        "load_average_at_start": load_average(),
    }
