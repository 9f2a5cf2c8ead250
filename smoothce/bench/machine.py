"""Where and with what a benchmark ran (``collect_env``, device, versions, backend, commit, date, load), as text."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch
from torch.utils import collect_env

from smoothce import registry

# Distributions whose versions are recorded when installed (collect_env lists only torch's kin).
PACKAGES = ("torch", "triton", "smoothce", "numpy", "liger-kernel", "flash-attn", "quack-kernels")
# The checkout's commit, "+dirty" with changes to tracked files; read only (no index refresh), never a tag.
GIT_DESCRIBE = ["git", "--no-optional-locks", "-C", str(Path(__file__).parent), "describe", "--always"]
GIT_DESCRIBE += ["--dirty=+dirty", "--exclude=*"]


def cpu_model(cpu_info: str | None = None) -> str:
    """The CPU's model name, from collect_env's ``lscpu`` output."""
    cpu_info = (collect_env.get_cpu_info(collect_env.run) or "") if cpu_info is None else cpu_info
    found = re.search(r"^Model name:\s*(.+)$", cpu_info, re.MULTILINE)
    return found.group(1).strip() if found else "unknown CPU"


def device_name(device: torch.device) -> str:
    return cpu_model() if device.type == "cpu" else getattr(torch, device.type).get_device_name(device)


def available_memory_bytes(device: torch.device) -> int:
    """Memory free for new tensors now: MemAvailable on CPU (Linux), ``mem_get_info`` on accelerators."""
    if device.type != "cpu":
        return getattr(torch, device.type).mem_get_info(device)[0]
    return int(re.search(r"MemAvailable:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024


def describe(device: torch.device) -> dict:
    """The record written with every result."""
    info = collect_env.get_env_info()._asdict()
    try:
        backend = registry.select(device).name
    except (ValueError, RuntimeError) as error:
        backend = f"unavailable ({error})"
    versions = {}
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    try:
        commit = subprocess.run(GIT_DESCRIBE, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # not a checkout, or no git
        commit = None
    accelerator = None if device.type == "cpu" else getattr(torch, device.type)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "device_type": device.type,
        "device_name": device_name(device),
        "device_memory_bytes": accelerator and accelerator.get_device_properties(device).total_memory,
        "cpu": cpu_model(info["cpu_info"]),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": info["os"],
        "versions": {"python": info["python_version"].split()[0], **versions},
        "smoothce_backend": backend,
        "smoothce_backend_env": os.environ.get("SMOOTHCE_BACKEND") or None,
        "commit": commit,
        "load_average_at_start": os.getloadavg()[0],  # the 1-minute load average: how busy the machine was
        "collect_env": info,
    }


def text(env: dict) -> str:
    """``describe``'s record in two sentences: when and on what, then versions, commit, backend and load."""
    memory = f", {env['device_memory_bytes'] / 2**30:.0f} GiB" if env.get("device_memory_bytes") else ""
    host = f"; host CPU {env['cpu']}" if env["device_type"] != "cpu" else ""
    backend = env["smoothce_backend"] + (" (set by SMOOTHCE_BACKEND)" if env.get("smoothce_backend_env") else "")
    end = f", {env['load_average_at_end']:.2f} at the end" if env.get("load_average_at_end") is not None else ""
    load = f"{env['load_average_at_start']:.2f} at the start{end}"
    busiest = max(env["load_average_at_start"], env.get("load_average_at_end") or 0.0)
    if env["logical_cores"] and busiest > env["logical_cores"]:
        load += " (above the core count: other work competed)"
    return (
        f"Measured {env['date']} on **{env['device_name']}{memory}{host}; {env['logical_cores']} logical cores, "
        f"{env['torch_threads']} torch threads; {env['platform']}**. Versions: "
        f"{', '.join(f'{k} {v}' for k, v in env['versions'].items())}; smoothce commit {env['commit']}; smoothce "
        f"backend `{backend}`. Load average (1 minute): {load}."
    )
