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
    assert "recipe options" in out
    # 4 dtypes x 3 reductions, 4 recipe option sets x 4 dtypes, the 5 hard cases for rounding,
    # 4 x 3 of the fused linear loss.
    assert out.count(" ok") == 12 + 16 + 5 + 12
    assert "FAIL" not in out
    assert out.rstrip().endswith("all checks passed")


def test_main_job_benchmark_tables_name_every_peer(monkeypatch, capsys):
    # The full job at tiny sizes, in this process: the checks, then both tables. aot_eager: the compiled
    # baseline's graph without Inductor's compile time (its speed is not what is tested here).
    import smoothce.__main__ as main_job
    from smoothce.bench import impls

    monkeypatch.setattr(impls, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setitem(main_job.BENCH_SHAPES, "cpu", (64, 1000))
    monkeypatch.setitem(main_job.LINEAR_SHAPES, "cpu", (64, 16, 1000))
    assert main_job.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| fwd+bwd fp32 64 × 1000 λ=0.1 |" in out
    assert "| fwd+bwd bf16 64 × 1000 λ=0.1 |" in out
    assert "speed-up vs torch-compile" in out
    linear_rows = out.split("linear + cross-entropy, 64x16x1000 fp32")[1].splitlines()[1:5]
    assert [row.split()[0] for row in linear_rows] == ["matmuls", "smoothce", "torch-eager", "torch-linear-ce"]
    assert out.rstrip().endswith("all checks passed")
