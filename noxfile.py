"""nox sessions: one per backend, plus lint and the benchmark. `nox` runs the CI set."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

nox.options.sessions = ["lint", "cpu", "triton_interpret", "distributed"]
nox.options.error_on_missing_interpreters = True

# The tested versions; override for another torch build (a CUDA or XPU wheel, say).
TORCH = os.environ.get("SMOOTHCE_TORCH", "torch==2.13.0")
TRITON = os.environ.get("SMOOTHCE_TRITON", "triton==3.9.0")
# The integration's framework, for the cpu session (transformers 5.24 is tested with torch 2.13).
TRANSFORMERS = os.environ.get("SMOOTHCE_TRANSFORMERS", "transformers==5.24.0")
ACCELERATE = os.environ.get("SMOOTHCE_ACCELERATE", "accelerate==1.15.0")
PYTEST = ["pytest", "-p", "no:cacheprovider"]


def _install(session: nox.Session, extras: str, torch_spec: str = TORCH, *pip_args: str) -> None:
    # torch first and pinned, so the package's own `torch>=2.5` pulls nothing else.
    session.install(torch_spec, *pip_args)
    session.install(f".[{extras}]")


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff's linter, and its formatter as a check, over the package, backends, tests, examples and this file."""
    session.install("ruff>=0.6")
    paths = ("smoothce", "backends", "tests", "examples", "noxfile.py")
    session.run("ruff", "check", *paths, *session.posargs)
    session.run("ruff", "format", "--check", *paths)


@nox.session
def cpu(session: nox.Session) -> None:
    """The op on the vectorized CPU backend: values, gradients, errors, compile, packaging, bench, transformers.

    transformers is installed, and its tests required (SMOOTHCE_REQUIRE_TRANSFORMERS), so they run
    here rather than skip, as are the tests of the compiled CPU recipe kernel (SMOOTHCE_REQUIRE_CPU_KERNEL:
    the machine's C++ compiler builds it); then the Trainer example.
    """
    _install(session, "test,bench")
    session.install(TRANSFORMERS, ACCELERATE)  # after torch, so accelerate's torch requirement is met
    session.run(
        *PYTEST,
        "tests",
        "--ignore=tests/test_triton_kernels.py",
        "--ignore=tests/test_distributed.py",
        *session.posargs,
        env={"SMOOTHCE_BACKEND": "", "SMOOTHCE_REQUIRE_TRANSFORMERS": "1", "SMOOTHCE_REQUIRE_CPU_KERNEL": "1"},
    )
    session.run("python", "examples/transformers_trainer.py")


@nox.session
def triton_interpret(session: nox.Session) -> None:
    """The Triton kernels of both GPU backends on CPU tensors, under TRITON_INTERPRET=1.

    The kernel tests, then the op's own value tests (plain and with the recipe options) and the
    fused linear loss's tests routed through each Triton backend.
    """
    _install(session, "test,triton")
    session.install(TRITON)
    session.run(
        *PYTEST,
        "tests/test_triton_kernels.py",
        "tests/test_triton_shard_kernels.py",
        *session.posargs,
        env={"TRITON_INTERPRET": "1"},
    )
    for backend in ("cuda-triton", "xpu-triton"):
        env = {"TRITON_INTERPRET": "1", "SMOOTHCE_BACKEND": backend}
        tests = ("tests/test_op.py", "tests/test_options.py", "tests/test_linear.py")
        session.run(*PYTEST, *tests, *session.posargs, env=env)


@nox.session
def distributed(session: nox.Session) -> None:
    """Vocabulary-parallel loss over torch.distributed: gloo, 2 and 4 processes on loopback."""
    _install(session, "test")
    session.run(*PYTEST, "tests/test_distributed.py", *session.posargs)


@nox.session
def cuda(session: nox.Session) -> None:
    """Triton kernels, the op and NCCL on an NVIDIA GPU; skips where there is none."""
    if shutil.which("nvidia-smi") is None:
        session.skip("no NVIDIA GPU here (nvidia-smi not found)")
    _install(session, "test,triton,bench", os.environ.get("SMOOTHCE_TORCH", "torch"))
    session.run(*PYTEST, "tests", *session.posargs, env={"SMOOTHCE_TEST_DEVICE": "cuda"})


@nox.session
def xpu(session: nox.Session) -> None:
    """Triton kernels and the op on an Intel XPU; skips where there is none.

    Uses PyTorch's own XPU build (torch 2.5+ with Triton for XPU);
    intel-extension-for-pytorch is not needed and not installed.
    """
    render_nodes = list(Path("/sys/class/drm").glob("renderD*/device/vendor"))
    if not any(node.read_text().strip() == "0x8086" for node in render_nodes):
        session.skip("no Intel GPU here (no Intel render node under /sys/class/drm)")
    index = os.environ.get("SMOOTHCE_XPU_INDEX", "https://download.pytorch.org/whl/xpu")
    _install(session, "test,bench", os.environ.get("SMOOTHCE_TORCH", "torch"), "--index-url", index)
    session.run(*PYTEST, "tests", *session.posargs, env={"SMOOTHCE_TEST_DEVICE": "xpu"})


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark (`python -m smoothce.bench`): --quick unless arguments after -- say otherwise."""
    _install(session, "bench")
    session.run("python", "-m", "smoothce.bench", *(session.posargs or ["--quick"]))
