"""Packaging: backends/ installs as smoothce.backends, in a wheel and in an editable install."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    not (ROOT / "pyproject.toml").exists(), reason="needs the source tree (pyproject.toml) beside the tests"
)


def _pip(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )


def test_wheel_holds_one_namespace(tmp_path):
    _pip("wheel", "--no-deps", "--wheel-dir", str(tmp_path), str(ROOT), cwd=tmp_path)
    (wheel,) = tmp_path.glob("smoothce-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "smoothce/backends/cpu.py" in names
    assert "smoothce/backends/base.py" in names
    assert "smoothce/backends/triton_kernels.py" in names
    assert "smoothce/backends/cpu_recipe_kernel.cpp" in names  # compiled on first use
    top_level = {name.split("/")[0] for name in names}
    assert top_level <= {"smoothce", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top_level


def test_editable_install_imports_backends(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # The new environment sees this one's packages (torch) through a .pth file, all but smoothce's
    # own (this environment may hold a regular install, which would shadow the editable one).
    parent = tmp_path / "parent-site"
    parent.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(("smoothce", "__editable__")):
            (parent / entry.name).symlink_to(entry)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    Path(site, "zz_parent_env.pth").write_text(f"{parent}\n")
    subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", "install", "--quiet", "--no-deps", "-e", str(ROOT)],
        check=True,
        timeout=600,
        capture_output=True,
    )
    script = (
        "import importlib.util, smoothce, smoothce.backends.cpu as cpu\n"
        "print(smoothce.registry.select('cpu').name)\n"
        "print(importlib.util.find_spec('backends'))\n"
        "print(cpu.__file__)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    out = subprocess.run(
        [str(python), "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=True
    ).stdout.split()
    assert out[0] == "cpu"
    assert out[1] == "None", "a top-level `backends` package must not be importable"
    assert Path(out[2]).resolve() == (ROOT / "backends" / "cpu.py").resolve()
