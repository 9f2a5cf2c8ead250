"""The backend registry: defaults, SMOOTHCE_BACKEND, third-party backends and entry points."""

from __future__ import annotations

import importlib.util
from importlib import metadata

import pytest
import torch

import smoothce
from smoothce import registry
from smoothce.backends.base import Backend
from smoothce.backends.cpu import CpuBackend


@pytest.fixture(autouse=True)
def scratch_registry(monkeypatch):
    """Each test works on a copy of the registry: backends it registers are gone afterwards.

    (A kernel registered for a new device type stays with torch; without a backend its calls
    raise the registry's "no backend" error.)
    """
    for name in ("_by_name", "_default_for"):
        monkeypatch.setattr(registry, name, dict(getattr(registry, name)))
    monkeypatch.setattr(registry, "_entry_points_loaded", registry._entry_points_loaded)


def test_builtin_backends(monkeypatch):
    monkeypatch.delenv("SMOOTHCE_BACKEND", raising=False)
    names = set(registry.backends())
    assert {"cpu", "cuda-triton", "xpu-triton"} <= names
    assert registry.select("cpu").name == "cpu"
    assert registry.select(torch.device("cpu")).name == "cpu"
    assert registry.get("cuda-triton").device_type == "cuda"
    assert registry.get("xpu-triton").device_type == "xpu"


def test_unknown_backend_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SMOOTHCE_BACKEND", "fast-magic")
    with pytest.raises(ValueError, match=r"unknown smoothce backend 'fast-magic': known backends are .*cpu"):
        registry.select("cpu")
    with pytest.raises(ValueError, match="fast-magic"):
        smoothce.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))


def test_device_without_backend_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("SMOOTHCE_BACKEND", raising=False)
    with pytest.raises(ValueError, match="no backend for 'mps' tensors"):
        registry.select("mps")


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("SMOOTHCE_BACKEND", "cuda-triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    has_triton = importlib.util.find_spec("triton") is not None
    expected = "set TRITON_INTERPRET=1" if has_triton else r"pip install 'smoothce\[triton\]'"
    with pytest.raises(RuntimeError, match=rf"backend 'cuda-triton' cannot run on 'cpu' tensors: .*{expected}"):
        registry.select("cpu")


class RecordingBackend(CpuBackend):
    """A third party's backend: the CPU math, recording each call."""

    name = "recording-cpu"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def loss_and_grad(self, *args):  # what the op calls (the default then calls forward)
        self.calls += 1
        return super().loss_and_grad(*args)


def test_third_party_backend_selected_by_environment(monkeypatch):
    backend = registry.register(RecordingBackend(), default=False)
    monkeypatch.delenv("SMOOTHCE_BACKEND", raising=False)
    assert registry.select("cpu").name == "cpu"  # default=False leaves the default alone
    monkeypatch.setenv("SMOOTHCE_BACKEND", "recording-cpu")
    assert registry.select("cpu") is backend
    logits = torch.randn(3, 5)
    target = torch.tensor([0, 4, 2])
    loss = smoothce.cross_entropy(logits, target)
    assert backend.calls == 1
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, target))


def test_entry_point_backends_are_loaded(monkeypatch):
    class EntryPointBackend(CpuBackend):
        name = "from-entry-point"

    class FakeEntryPoint:
        name = "from-entry-point"

        def load(self):
            return EntryPointBackend  # a class (callable) returning a Backend

    def fake_entry_points(group):
        assert group == "smoothce.backends"
        return [FakeEntryPoint()]

    monkeypatch.setattr(metadata, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    assert isinstance(registry.get("from-entry-point"), EntryPointBackend)


def test_register_rejects_bad_backends():
    with pytest.raises(TypeError, match=r"expected a smoothce\.backends\.base\.Backend"):
        registry.register(object())

    class Nameless(Backend):
        pass

    with pytest.raises(ValueError, match="non-empty name and device_type"):
        registry.register(Nameless())


def test_every_device_type_reaches_the_kernels():
    # One kernel for every device type (CompositeExplicitAutograd): a backend for a device type
    # smoothce did not know needs no registration of its own, and the ops' fakes serve meta tensors.
    ops = (
        "smoothce::cross_entropy_fwd",
        "smoothce::cross_entropy_recipe_fwd",
        "smoothce::linear_cross_entropy_fwd",
        "smoothce::linear_cross_entropy_recipe_fwd",
        "smoothce::scale_kept",
    )
    for op in ops:
        for key in ("CPU", "CUDA", "XPU", "PrivateUse1", "Meta"):
            assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(op, key), (op, key)
