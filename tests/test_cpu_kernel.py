"""The CPU backend's compiled recipe kernel (``backends/cpu_kernel.py``, ``cpu_recipe_kernel.cpp``): its own exp
and tanh against float64, its dtype conversions bit for bit against torch's, the build cache, and the
fallback where it cannot be built. (Its rows are tested with the torch blocks' in test_cpu_recipe.py.)
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cpu_kernel_library, make_logits, make_target

import smoothce
from smoothce.backends import cpu_kernel
from smoothce.reference import cross_entropy_reference


def ulps(value, exact):
    """|value - exact| in units of the fp32 spacing at ``exact`` (float64)."""
    magnitude = exact.float().abs()
    spacing = torch.nextafter(magnitude, torch.tensor(math.inf)) - magnitude
    return (value.double() - exact).abs() / spacing.double()


def test_tanh_within_about_an_ulp():
    lib = cpu_kernel_library()
    generator = torch.Generator().manual_seed(0)
    u = torch.cat(
        [
            torch.empty(1 << 20).uniform_(-12.0, 12.0, generator=generator),
            torch.empty(1 << 20).uniform_(-1.0, 1.0, generator=generator),  # both sides of the switch at 0.8
            torch.exp2(torch.empty(1 << 16).uniform_(-120.0, 0.0, generator=generator)),  # small, to subnormal
        ]
    )
    t = cpu_kernel.each(lib, "tanh", u)
    # (1.02 ulps where the CPU has FMA, 1.10 without: an x86-64-v2 build)
    assert float(ulps(t, torch.tanh(u.double())).max()) <= 1.25
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, 9.5, 100.0])
    out = cpu_kernel.each(lib, "tanh", special)
    assert out[:4].tolist() == [0.0, -0.0, 1.0, -1.0]
    assert math.copysign(1.0, float(out[1])) == -1.0
    assert math.isnan(out[4])
    assert out[5:].tolist() == torch.tanh(special[5:].double()).float().tolist()


def test_exp_within_an_ulp_and_subnormals_rounded_once():
    lib = cpu_kernel_library()
    generator = torch.Generator().manual_seed(1)
    x = torch.cat([torch.empty(1 << 20).uniform_(-110.0, 89.0, generator=generator), torch.linspace(-1, 1, 4097)])
    exact = torch.exp(x.double())
    e = cpu_kernel.each(lib, "exp", x)
    normal = (exact >= 2.0**-126) & (exact <= torch.finfo(torch.float32).max)
    assert float(ulps(e[normal], exact[normal]).max()) <= 1.25  # (0.92 with FMA, 1.14 without)
    subnormal = exact < 2.0**-126  # to the nearest multiple of 2^-149, give or take that rounding
    assert float((e[subnormal].double() - exact[subnormal]).abs().max()) <= 2.0**-149
    assert bool(torch.isinf(e[exact > torch.finfo(torch.float32).max]).all())
    special = cpu_kernel.each(lib, "exp", torch.tensor([0.0, -math.inf, math.inf, math.nan, -104.0]))
    assert special[:3].tolist() == [1.0, 0.0, math.inf]
    assert math.isnan(special[3])
    assert float(special[4]) == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_conversions_are_torchs(dtype):
    # Every 16-bit pattern widened, and fp32 values of every magnitude (normal, subnormal and overflowing
    # halves, ties, inf, NaN) rounded, bit for bit as torch converts them (NaN as NaN).
    lib = cpu_kernel_library()
    patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    widened = cpu_kernel.each(lib, "load", patterns, dtype)
    expected = patterns.float()
    assert bool(((widened.view(torch.int32) == expected.view(torch.int32)) | expected.isnan() & widened.isnan()).all())
    generator = torch.Generator().manual_seed(2)
    values = torch.cat(
        [
            torch.randn(1 << 18, generator=generator) * torch.exp2(torch.empty(1 << 18).uniform_(-30, 20)),
            torch.randint(0, 2**31 - 1, (1 << 18,), generator=generator, dtype=torch.int32).view(torch.float32),
            expected[~expected.isnan()] * 1.5,  # halfway between neighbours: ties to even
            torch.tensor([math.inf, -math.inf, math.nan, 65504.0, 65519.99, 65520.0, 2.0**-25, 2.0**-24, 0.0, -0.0]),
        ]
    )
    rounded = cpu_kernel.each(lib, "store", values, dtype)
    expected = values.to(dtype)
    same = (rounded.view(torch.int16) == expected.view(torch.int16)) | (expected.isnan() & rounded.isnan())
    assert bool(same.all()), values[~same][:8]


def test_build_is_cached(monkeypatch, tmp_path):
    # The first load compiles into the cache folder; a later process (here: a fresh load) finds it there.
    cpu_kernel_library()
    monkeypatch.setenv("SMOOTHCE_CACHE_DIR", str(tmp_path))
    compiles, run = [], cpu_kernel.subprocess.run

    def counting(command, **options):
        if "-o" in command:
            compiles.append(command)
        return run(command, **options)

    monkeypatch.setattr(cpu_kernel.subprocess, "run", counting)
    for _ in range(2):
        monkeypatch.setattr(cpu_kernel, "_loaded", {})
        assert cpu_kernel.library() is not None
    assert len(compiles) == 1
    (built,) = tmp_path.glob("cpu_recipe_kernel-*.so")
    assert list(tmp_path.iterdir()) == [built]  # the build folder is gone


def test_no_compiler_warns_and_falls_back(monkeypatch, tmp_path):
    # No compiler: one RuntimeWarning naming why, then the vectorized-torch blocks, with the same accuracy.
    monkeypatch.setenv("SMOOTHCE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    logits = make_logits((64, 3001), torch.float32).requires_grad_(True)
    target = make_target((64,), 3001)
    options = dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0)
    with pytest.warns(RuntimeWarning, match="could not be built.*no-such-compiler"):
        loss = smoothce.cross_entropy(logits, target, **options)
    loss.backward()
    assert "no-such-compiler" in cpu_kernel.unavailable_reason()
    ref_loss, ref_grad = cross_entropy_reference(logits.detach(), target, **options)
    torch.testing.assert_close(loss.detach().double(), ref_loss, rtol=2e-6, atol=0)
    torch.testing.assert_close(logits.grad.double(), ref_grad, rtol=1e-5, atol=4e-6 * float(ref_grad.abs().max()))
    smoothce.cross_entropy(logits, target, **options)  # warned once only (warnings are errors here)


def test_turned_off_by_the_environment(monkeypatch, tmp_path):
    # SMOOTHCE_CPU_KERNEL=0: nothing built, no warning, the reason said.
    monkeypatch.setenv("SMOOTHCE_CPU_KERNEL", "0")
    monkeypatch.setenv("SMOOTHCE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    assert cpu_kernel.library() is None
    assert cpu_kernel.unavailable_reason() == "SMOOTHCE_CPU_KERNEL=0"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("dtype", "layout", "served"),
    [
        (torch.float32, "contiguous", True),
        (torch.bfloat16, "row-strided", True),  # rows of a wider tensor
        (torch.float16, "contiguous", True),
        (torch.float64, "contiguous", False),  # float64 keeps the torch blocks
        (torch.float32, "column-strided", False),  # a transposed tensor
    ],
)
def test_which_tensors_it_serves(dtype, layout, served):
    logits = torch.zeros((8, 40), dtype=dtype)
    if layout == "row-strided":
        logits = torch.zeros((8, 48), dtype=dtype)[:, :40]
    elif layout == "column-strided":
        logits = logits.t().contiguous().t()
    assert cpu_kernel.takes(logits, torch.empty_like(logits)) is served
    assert cpu_kernel.takes(logits, None) is served
