"""The main job, `python -m smoothce`: environment, check against PyTorch, exit status."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib import metadata

import torch


def test_main_job_checks_pass(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "smoothce", "--no-bench"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stderr, result.stderr  # a fresh environment prints no stray warning
    out = result.stdout
    # The environment line names the versions installed here.
    triton = metadata.version("triton") if importlib.util.find_spec("triton") else "not installed"
    assert f"torch {torch.__version__}, triton {triton}, smoothce {metadata.version('smoothce')}" in out
    assert "backend cpu" in out
    assert "hard cases" in out
    assert "fused linear + cross-entropy" in out
    # 4 dtypes x 3 reductions, the 5 hard cases for rounding, 4 x 3 of the fused linear loss.
    assert out.count(" ok") == 12 + 5 + 12
    assert "FAIL" not in out
    assert out.rstrip().endswith("all checks passed")
