"""The "cpu" backend's compiled recipe rows: ``cpu_recipe_kernel.cpp``, built on first use, run through ctypes.

The first call that wants it compiles the source with the machine's C++ compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``; a few seconds) for this CPU (``-march=native``) into a cache folder
(``$SMOOTHCE_CACHE_DIR``, else ``$XDG_CACHE_HOME/smoothce`` or ``~/.cache/smoothce``), under a name that
hashes the source, the compiler, the flags and the CPU's features, so that a later process loads it at
once. ctypes lets go of the GIL during each call: ``recipe_rows`` hands ranges of rows to as many Python
threads as torch has, each running its ranges in C.

Where no compiler works, or ``SMOOTHCE_CPU_KERNEL=0``, ``library()`` is None and ``cpu_recipe`` keeps its
vectorized-torch blocks (the same math, slower with a soft cap); a failed build warns once, naming why.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_recipe_kernel.cpp")
FLAGS = ("-O3", "-march=native", "-std=gnu++17", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math")
# The dtypes the kernel reads and writes (its enum Type), each computed in fp32.
TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# The source's PLACES: a scratch row is V + 64 PLACES floats.
PLACES = 16
# Rows go to several threads from this many logits a thread on, in about this many calls a thread.
WORKER_ELEMENTS = 1 << 16
CALLS_PER_WORKER = 8


class Args(ctypes.Structure):
    """``struct Args`` of the source, field for field."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("x_stride", ctypes.c_int64),
        ("g", ctypes.c_void_p),
        ("g_stride", ctypes.c_int64),
        ("k", ctypes.c_void_p),
        ("weight", ctypes.c_void_p),
        ("coeff", ctypes.c_void_p),
        ("coeff_stride", ctypes.c_int64),
        ("z_coeff", ctypes.c_void_p),
        ("z_coeff_stride", ctypes.c_int64),
        ("neg_max", ctypes.c_void_p),
        ("e_k", ctypes.c_void_p),
        ("rest", ctypes.c_void_p),
        ("total", ctypes.c_void_p),
        ("spread", ctypes.c_void_p),
        ("scratch", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("V", ctypes.c_int64),
        ("cap", ctypes.c_float),
        ("column", ctypes.c_float),
        ("x_type", ctypes.c_int32),
        ("g_type", ctypes.c_int32),
        ("smooth", ctypes.c_int32),
    ]


_lock = threading.Lock()
_loaded: dict[str, object] = {}  # "library" (a CDLL or None) and "reason" once tried


def disabled() -> bool:
    """Whether ``SMOOTHCE_CPU_KERNEL=0`` turns the kernel off (read on every call, so tests may set it)."""
    return os.environ.get("SMOOTHCE_CPU_KERNEL", "1").strip() == "0"


def library() -> ctypes.CDLL | None:
    """The built kernel, loaded; None where it is turned off or cannot be built (``unavailable_reason``)."""
    if disabled():
        return None
    with _lock:
        if "library" not in _loaded:
            try:
                _loaded["library"], _loaded["reason"] = _load(), None
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                _loaded["library"], _loaded["reason"] = None, str(error)
                warnings.warn(
                    f"smoothce: the CPU recipe kernel could not be built ({error}); the recipe options run on "
                    "the slower vectorized-torch path. Install a C++ compiler (or set CXX), point "
                    "SMOOTHCE_CACHE_DIR at a writable folder, or set SMOOTHCE_CPU_KERNEL=0 to skip the build.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return _loaded["library"]


def unavailable_reason() -> str | None:
    """None where ``library()`` gives the kernel, else why not."""
    if disabled():
        return "SMOOTHCE_CPU_KERNEL=0"
    return None if library() is not None else str(_loaded["reason"])


def _cache_dir() -> Path:
    if os.environ.get("SMOOTHCE_CACHE_DIR"):
        return Path(os.environ["SMOOTHCE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smoothce"


def _cpu_features() -> str:
    """The CPU's feature line (what -march=native compiles for), so a cache shared between machines
    never hands one a build for another's instructions."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _load() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or next(
        (found for name in ("c++", "g++", "clang++") if (found := shutil.which(name))), None
    )
    if compiler is None:
        raise RuntimeError("no C++ compiler found ($CXX, c++, g++ or clang++)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    key = hashlib.sha256(
        b"\0".join(
            part.encode() if isinstance(part, str) else part
            for part in (SOURCE.read_bytes(), compiler, version, *FLAGS, platform.machine(), _cpu_features())
        )
    ).hexdigest()[:20]
    folder = _cache_dir()
    built = folder / f"cpu_recipe_kernel-{key}.so"
    if not built.exists():
        folder.mkdir(parents=True, exist_ok=True)
        # Built beside its final name, then renamed there: processes building at once each leave a whole file.
        with tempfile.TemporaryDirectory(dir=folder) as building:
            partial = Path(building) / built.name
            result = subprocess.run(
                [compiler, *FLAGS, str(SOURCE), "-o", str(partial)], capture_output=True, text=True, timeout=300
            )
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
            os.replace(partial, built)
    lib = ctypes.CDLL(str(built))
    lib.smoothce_args_size.restype = ctypes.c_int64
    if lib.smoothce_args_size() != ctypes.sizeof(Args):
        size = lib.smoothce_args_size()
        raise RuntimeError(f"{built.name}: struct Args is {size} bytes, ctypes' {ctypes.sizeof(Args)}")
    lib.smoothce_recipe_rows.argtypes = [ctypes.POINTER(Args)]
    lib.smoothce_recipe_rows.restype = None
    lib.smoothce_each.argtypes = [ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.smoothce_each.restype = None
    return lib


def takes(logits: torch.Tensor, grad: torch.Tensor | None) -> bool:
    """Whether the kernel serves these tensors: fp32/bf16/fp16 with unit column strides (the vectorized-torch
    blocks take the rest: float64, and other strides)."""
    if logits.dtype not in TYPES or (logits.shape[1] > 1 and logits.stride(1) != 1):
        return False
    return grad is None or (grad.dtype in TYPES and (grad.shape[1] == 1 or grad.stride(1) == 1))


def each(lib, function: str, values: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The kernel's own ``function`` on the contiguous 1-D ``values`` (for the tests): "tanh" or "exp"
    (fp32), "load" (``values`` of ``dtype`` widened to fp32) or "store" (fp32 rounded to ``dtype``)."""
    fn = ("tanh", "exp", "load", "store").index(function)
    out = torch.empty(values.shape, dtype=dtype if function == "store" else torch.float32)
    lib.smoothce_each(
        fn, TYPES[values.dtype if function == "load" else dtype], values.data_ptr(), out.data_ptr(), values.numel()
    )
    return out


def scratch(rows: int, num_classes: int) -> torch.Tensor:
    """A worker's scratch: ``rows`` rows of fp32, each with room to place it clear of 4K aliasing (PLACES)."""
    return torch.empty(rows * (num_classes + PLACES * 64), dtype=torch.float32)


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def recipe_rows(lib, logits, k, grad, weight, column, coeff, z_coeff, cap, stats, smooth):
    """Run the kernel over every row (``cpu_recipe._blocked``'s operands; ``takes(logits, grad)`` holds):

    logits (N, V); k (N, 1) int64 contiguous; grad (N, V) or None; weight (V,) fp32 contiguous or None;
    column a float, the gradient's column term b_j = column w_j (w_j = 1 without weights); coeff and
    z_coeff fp32, 0-d or (N, 1) contiguous (None without a gradient; z_coeff None: no z-loss); cap a
    float or None; stats the (N, 1) fp32 contiguous -m, e_k, q, S and smoothing sum it writes; smooth
    whether that sum is wanted.
    """
    n_rows, num_classes = logits.shape
    neg_max, e_k, rest, total, spread = stats
    scratch_rows = (cap is not None) + (grad is not None and grad.dtype != torch.float32)
    workers = max(1, min(torch.get_num_threads(), n_rows, n_rows * num_classes // WORKER_ELEMENTS))
    # Ranges of rows handed out as the workers come for them: a worker a descheduled thread slows does fewer.
    rows_per_call = -(-n_rows // (workers * CALLS_PER_WORKER))
    starts = iter(range(0, n_rows, rows_per_call))
    taking = threading.Lock()

    def per_row(tensor, start):  # a 0-d operand is shared; an (N,) one starts at the row
        return None if tensor is None else (tensor.data_ptr() + (start * 4 if tensor.dim() else 0))

    def rows(start, stop, buffer):
        return Args(
            x=logits[start].data_ptr(),
            x_stride=logits.stride(0),
            g=None if grad is None else grad[start].data_ptr(),
            g_stride=0 if grad is None else grad.stride(0),
            k=k[start].data_ptr(),
            weight=_pointer(weight),
            coeff=per_row(coeff, start),
            coeff_stride=1 if coeff is not None and coeff.dim() else 0,
            z_coeff=per_row(z_coeff, start),
            z_coeff_stride=1 if z_coeff is not None and z_coeff.dim() else 0,
            neg_max=neg_max[start].data_ptr(),
            e_k=e_k[start].data_ptr(),
            rest=rest[start].data_ptr(),
            total=total[start].data_ptr(),
            spread=spread[start].data_ptr(),
            scratch=_pointer(buffer),
            rows=stop - start,
            V=num_classes,
            cap=0.0 if cap is None else cap,
            column=column,
            x_type=TYPES[logits.dtype],
            g_type=0 if grad is None else TYPES[grad.dtype],
            smooth=int(smooth),
        )

    def run(_worker):
        buffer = scratch(scratch_rows, num_classes) if scratch_rows else None
        while True:
            with taking:
                start = next(starts, None)
            if start is None:
                return
            lib.smoothce_recipe_rows(ctypes.byref(rows(start, min(start + rows_per_call, n_rows), buffer)))

    if workers == 1:
        run(0)
        return
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="smoothce-cpu") as pool:
        list(pool.map(run, range(workers)))
