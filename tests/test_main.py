"""The main job, `python -m smoothce`: environment, check against PyTorch, exit status."""

from __future__ import annotations

import subprocess
import sys


def test_main_job_checks_pass(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "smoothce", "--no-bench"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "torch " in out
    assert "triton " in out
    assert "backend cpu" in out
    assert out.count(" ok") == 12 + 5  # 4 dtypes x 3 reductions, then the 5 hard cases for rounding
    assert "hard cases" in out
    assert "all checks passed" in out
