"""Tests of the vocabulary-parallel Triton kernels (backends/triton_shard_kernels.py).

``shard_stats`` and ``shard_grad`` of both Triton backends are compared with the float64
truth of their contract (``Backend.shard_stats``/``shard_grad`` in backends/base.py) and
with the plain-torch defaults there. Without a GPU they run on CPU tensors in Triton's
interpreter:

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_shard_kernels.py

With a CUDA or XPU device (TRITON_INTERPRET unset) the same tests run on it. Blocks are
capped at 16 columns, so small slices still take the unmasked full blocks, the masked tail,
the per-lane maxima and their combination. Without a GPU one test compiles the kernels for
sm_90 ahead of time. The last test runs the whole vocabulary-parallel loss on two gloo ranks
through the cuda-triton backend in the interpreter.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed: pip install 'smoothce[triton]'", allow_module_level=True)

from smoothce import registry
from smoothce.backends.base import Backend, Recipe
from smoothce.backends.triton_backend import interpreter_enabled
from smoothce.numerics import loss_dtype
from smoothce.reference import cross_entropy_reference

INTERPRET = interpreter_enabled()
DEVICE = "cpu" if INTERPRET else registry.default_device().type
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip(
        "the Triton kernels need TRITON_INTERPRET=1 (CPU tensors in Triton's interpreter) or a CUDA/XPU device",
        allow_module_level=True,
    )

BACKENDS = ["cuda-triton", "xpu-triton"] if DEVICE == "cpu" else [f"{DEVICE}-triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# V_i: 1 (the slice is its own max), 13 (only a masked tail), 16 (one full block, no tail),
# 40 (16 + 16 + a tail of 8), 48 (three full blocks, no tail).
LOCAL_SIZES = [1, 13, 16, 40, 48]
# Global classes around the slice: 9 before it and 11 after, so targets fall inside and outside.
BEFORE, AFTER = 9, 11
DEFAULT = Backend()  # the plain-torch defaults


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The Triton backend under test, with blocks of 16 columns."""
    chosen = registry.get(request.param)
    monkeypatch.setattr(chosen, "max_block_v", 16)
    return chosen


def make_rows(n_rows, local, dtype, *, seed=0):
    """Full rows (N, V) in float64 holding ``dtype``-rounded values, targets, and the slice's columns.

    Row 0 targets the slice's first class, row 1 is ignored, row 2 targets its last class with
    its logit raised by 12 (p_k near 1), row 3 has its max twice (the second one counts as an
    exact 1), row 4 targets a class before the slice, row 5 one after it.
    """
    num_classes = BEFORE + local + AFTER
    gen = torch.Generator().manual_seed(seed)
    full = 4 * torch.randn(n_rows, num_classes, generator=gen, dtype=torch.float64)
    target = torch.randint(0, num_classes, (n_rows,), generator=gen)
    own = slice(BEFORE, BEFORE + local)
    target[0] = BEFORE
    target[1] = -100
    target[2] = BEFORE + local - 1
    full[2, target[2]] += 12
    full[3, own] = full[3, own].clamp_max(5.0)
    full[3, BEFORE] = full[3, BEFORE + local - 1] = 5.0
    target[4] = 3
    target[5] = num_classes - 2
    return full.to(dtype).double(), target, own


def true_stats(full, target, own, lam, weight=None):
    """The contract's (4, N) rows m, R, t, z_k of the slice, in float64 (t weighted by the slice's ``weight``)."""
    x = full[:, own]
    m, first = x.max(dim=1, keepdim=True)
    shift = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.exp(x - shift).scatter(1, first, 0.0)
    t = torch.zeros(x.shape[0], dtype=x.dtype)
    if lam > 0:
        t = (x - shift).sum(1) if weight is None else (x - shift) @ weight
    k = target - own.start
    owned = (target != -100) & (k >= 0) & (k < x.shape[1])
    z_k = torch.where(owned, x.gather(1, torch.where(owned, k, 0)[:, None])[:, 0], 0.0)
    return torch.stack([m[:, 0], e.sum(1), t, z_k])


def global_stats(full):
    """(M, e): the whole rows' max and the excess S - 1 of S = sum exp(z - M), in float64."""
    m = full.amax(1)
    return m, torch.exp(full - m[:, None]).sum(1) - 1.0


def stats_tolerance(dtype):
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-6, "atol": 2e-6}


def grad_tolerance(dtype):
    # One rounding to the dtype (to nearest, in the interpreter too), after float32 work.
    if dtype == torch.float64:
        return {"rtol": 1e-12, "atol": 1e-14}
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-7}
    return {"rtol": 2 * torch.finfo(dtype).eps, "atol": 1e-7}


@pytest.mark.parametrize("start_as_tensor", [False, True], ids=["int", "tensor"])
@pytest.mark.parametrize("lam", [0.0, 0.1])
@pytest.mark.parametrize("local", LOCAL_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shard_stats(backend, dtype, local, lam, start_as_tensor):
    full, target, own = make_rows(6, local, dtype)
    logits = full[:, own].to(DEVICE, dtype)
    start = torch.tensor(own.start, device=DEVICE) if start_as_tensor else own.start
    stats = backend.shard_stats(logits, target.to(DEVICE), start, lam, -100)
    assert stats.shape == (4, 6)
    assert stats.dtype == loss_dtype(dtype)
    torch.testing.assert_close(stats.cpu().double(), true_stats(full, target, own, lam), **stats_tolerance(dtype))
    default = DEFAULT.shard_stats(logits, target.to(DEVICE), start, lam, -100)
    torch.testing.assert_close(stats, default, **stats_tolerance(dtype))


@pytest.mark.parametrize("vocab_as_tensor", [False, True], ids=["int", "tensor"])
@pytest.mark.parametrize("lam", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("local", LOCAL_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shard_grad(backend, dtype, local, lam, vocab_as_tensor):
    # The slice of the single-process gradient, times a scale, from the whole rows' M and e.
    full, target, own = make_rows(6, local, dtype)
    num_classes = full.shape[1]
    acc = loss_dtype(dtype)
    row_max, excess = (x.to(DEVICE, acc) for x in global_stats(full))
    logits = full[:, own].to(DEVICE, dtype)
    if vocab_as_tensor:
        start, vocab = torch.tensor([own.start, num_classes], device=DEVICE).unbind(0)
    else:
        start, vocab = own.start, num_classes
    scale = torch.tensor(0.25, dtype=acc, device=DEVICE)
    grad = torch.full_like(logits, float("nan"))
    backend.shard_grad(logits, target.to(DEVICE), start, vocab, row_max, excess, lam, -100, scale, grad)
    _, ref = cross_entropy_reference(full, target, label_smoothing=lam, reduction="sum")
    torch.testing.assert_close(grad.cpu().double(), 0.25 * ref[:, own], **grad_tolerance(dtype))
    default = torch.full_like(logits, float("nan"))
    DEFAULT.shard_grad(logits, target.to(DEVICE), start, vocab, row_max, excess, lam, -100, scale, default)
    torch.testing.assert_close(grad, default, **grad_tolerance(dtype))


# Issue 16's options for the slice (``Recipe``): the slice's class weights, a cap that bends
# logits of scale 4 well into tanh, the z-loss (only the gradient sees it), and all at once.
def recipe_for(option, own, num_classes, acc):
    """(the Recipe a rank passes for its slice, the full (V,) float64 weights or None, z_loss, softcap)."""
    gen = torch.Generator().manual_seed(7)
    weight = 0.25 + 2 * torch.rand(num_classes, generator=gen, dtype=torch.float64)
    full_weight = weight if option in ("weight", "all") else None
    z_loss = 1e-2 if option in ("z_loss", "all") else 0.0
    cap = 3.0 if option in ("softcap", "all") else None
    slice_weight = None if full_weight is None else full_weight[own].to(DEVICE, acc)
    return Recipe(slice_weight, z_loss, cap), full_weight, z_loss, cap


def capped(full, cap):
    return full if cap is None else cap * torch.tanh(full / cap)


@pytest.mark.parametrize("option", ["weight", "softcap", "all"])
@pytest.mark.parametrize("lam", [0.0, 0.1])
@pytest.mark.parametrize("local", [13, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_shard_stats_recipe(backend, dtype, local, lam, option):
    # m, R, z_k of the capped slice, t = sum_j w_j (z'_j - m~) weighted by the slice's weights.
    full, target, own = make_rows(6, local, dtype)
    acc = loss_dtype(dtype)
    recipe, weight, _, cap = recipe_for(option, own, full.shape[1], acc)
    logits = full[:, own].to(DEVICE, dtype)
    stats = backend.shard_stats(logits, target.to(DEVICE), own.start, lam, -100, recipe)
    expected = true_stats(capped(full, cap), target, own, lam, None if weight is None else weight[own])
    torch.testing.assert_close(stats.cpu().double(), expected, **stats_tolerance(dtype))
    default = DEFAULT.shard_stats(logits, target.to(DEVICE), own.start, lam, -100, recipe)
    torch.testing.assert_close(stats, default, **stats_tolerance(dtype))


@pytest.mark.parametrize("option", ["weight", "z_loss", "softcap", "all"])
@pytest.mark.parametrize("lam", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("local", [40])  # full blocks and a masked tail
def test_shard_grad_recipe(backend, dtype, local, lam, option):
    # The slice of the single-process gradient with the options, from the capped rows' M, e and lse,
    # the targets' weights w_k and their sum W (what the all-reduces hand every rank).
    full, target, own = make_rows(6, local, dtype)
    num_classes = full.shape[1]
    acc = loss_dtype(dtype)
    recipe, weight, z_loss, cap = recipe_for(option, own, num_classes, acc)
    z = capped(full, cap)
    row_max, excess = global_stats(z)
    lse = torch.logsumexp(z, 1)
    valid = target != -100
    extra = {"lse": lse.to(DEVICE, acc)}
    if weight is not None:
        w_k = torch.where(valid, weight[torch.where(valid, target, 0)], 0.0)
        extra.update(target_weight=w_k.to(DEVICE, acc), total_weight=weight.sum().to(DEVICE, acc))
    logits = full[:, own].to(DEVICE, dtype)
    row_max, excess = row_max.to(DEVICE, acc), excess.to(DEVICE, acc)
    scale = torch.tensor(0.25, dtype=acc, device=DEVICE)
    args = (target.to(DEVICE), own.start, num_classes, row_max, excess, lam, -100, scale)
    grad = torch.full_like(logits, float("nan"))
    backend.shard_grad(logits, *args, grad, recipe, **extra)
    options = {"label_smoothing": lam, "reduction": "sum", "z_loss": z_loss, "softcap": cap}
    _, ref = cross_entropy_reference(full, target, weight, **options)
    tol = grad_tolerance(dtype)
    if cap is not None and dtype != torch.float64:
        tol = {"rtol": tol["rtol"], "atol": 4e-7}  # the chain rule 1 - tanh^2: float32's digits of it
    torch.testing.assert_close(grad.cpu().double(), 0.25 * ref[:, own], **tol)
    default = torch.full_like(logits, float("nan"))
    DEFAULT.shard_grad(logits, *args, default, recipe, **extra)
    torch.testing.assert_close(grad, default, **tol)


@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_shard_grad_over_its_own_logits(backend, lam):
    # The gradient written over the slice it is computed from gives the same values (the target
    # column's logit is read before the sweep overwrites it).
    full, target, own = make_rows(6, 40, torch.float32)
    row_max, excess = (x.to(DEVICE) for x in global_stats(full))
    logits = full[:, own].to(DEVICE, torch.float32)
    scale = torch.tensor(0.25, device=DEVICE)
    grad = torch.empty_like(logits)
    backend.shard_grad(logits, target.to(DEVICE), own.start, full.shape[1], row_max, excess, lam, -100, scale, grad)
    same = logits.clone()
    backend.shard_grad(same, target.to(DEVICE), own.start, full.shape[1], row_max, excess, lam, -100, scale, same)
    torch.testing.assert_close(same, grad, rtol=0, atol=0)


def _transposed(logits):
    return logits.t().contiguous().t()  # column stride N


def _padded(logits):
    wide = torch.zeros(logits.shape[0], logits.shape[1] + 5, dtype=logits.dtype, device=logits.device)
    wide[:, 3 : 3 + logits.shape[1]] = logits
    return wide[:, 3 : 3 + logits.shape[1]]  # row stride V_i + 5


@pytest.mark.parametrize("layout", [_transposed, _padded], ids=lambda f: f.__name__[1:])
def test_strided_inputs_and_outputs(backend, layout):
    full, target, own = make_rows(6, 40, torch.float32)
    logits = layout(full[:, own].to(DEVICE, torch.float32))
    assert not logits.is_contiguous()
    stats = backend.shard_stats(logits, target.to(DEVICE), own.start, 0.1, -100)
    expected = true_stats(full, target, own, 0.1)
    torch.testing.assert_close(stats.cpu().double(), expected, **stats_tolerance(torch.float32))
    row_max, excess = global_stats(full)
    # Strided M and e (columns of a (N, 2) tensor) and a transposed gradient buffer.
    both = torch.stack([row_max, excess], 1).float().to(DEVICE)
    grad = _transposed(torch.empty_like(logits))
    backend.shard_grad(
        logits,
        target.to(DEVICE),
        own.start,
        full.shape[1],
        both[:, 0],
        both[:, 1],
        0.1,
        -100,
        torch.tensor(1.0, device=DEVICE),
        grad,
    )
    _, ref = cross_entropy_reference(full, target, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(grad.cpu().double(), ref[:, own], **grad_tolerance(torch.float32))


def test_int32_targets_and_an_ignore_index_that_is_a_class(backend):
    # ignore_index=12 is a class of the slice: rows targeting it are ignored (z_k = 0, zero gradient).
    full, target, own = make_rows(6, 40, torch.float32)
    target[1] = 12
    logits = full[:, own].to(DEVICE)
    t32 = target.to(DEVICE, torch.int32)
    stats = backend.shard_stats(logits, t32, own.start, 0.1, 12)
    torch.testing.assert_close(stats, DEFAULT.shard_stats(logits, t32, own.start, 0.1, 12), rtol=2e-6, atol=2e-6)
    assert float(stats[3, 1]) == 0.0
    row_max, excess = (x.float().to(DEVICE) for x in global_stats(full))
    grad = torch.empty_like(logits)
    backend.shard_grad(
        logits, t32, own.start, full.shape[1], row_max, excess, 0.1, 12, torch.tensor(1.0, device=DEVICE), grad
    )
    _, ref = cross_entropy_reference(full, target, label_smoothing=0.1, ignore_index=12, reduction="sum")
    torch.testing.assert_close(grad.cpu().double(), ref[:, own], **grad_tolerance(torch.float32))
    assert not grad[1].any()


def test_edge_rows(backend):
    # Rows where float32 loses digits unless the sums are relative to the (running) max.
    local = 64  # four blocks of 16
    rows = torch.zeros(7, local, dtype=torch.float64)
    rows[0] = 30000.0  # a shared offset: m = 30000, R = 63, t = 0 exactly
    rows[1] = -3e4 + torch.randn(local, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows[2, 50] = 19.45  # confident, max in the last block: R = 63 exp(-19.45), never added to a 1
    rows[3, 5] = rows[3, 40] = 19.45  # the max twice, in different blocks: R = 1 + 62 exp(-19.45)
    rows[4, 20:] = float("-inf")  # -inf columns after the max: R, t finite then -inf
    rows[5] = float("-inf")  # an all -inf slice: m = -inf, R = 0, t = -inf
    rows[6, :30] = float("-inf")  # -inf first, the max in a later block: t = -inf
    rows[6, 35] = 3.0
    rows = rows.float().double()
    target = torch.tensor([3, 70, 50, 5, 2, -100, 35])
    own = slice(0, local)
    logits = rows.to(DEVICE, torch.float32)
    stats = backend.shard_stats(logits, target.to(DEVICE), 0, 0.1, -100).cpu().double()
    expected = true_stats(rows, target, own, 0.1)
    torch.testing.assert_close(stats, expected, rtol=1e-6, atol=0.0)
    assert stats[:, 0].tolist() == [30000.0, 63.0, 0.0, 30000.0]


def test_confident_target_column(backend):
    # p_k - 1 for p_k near 1 taken as -e / S: relative precision, where float32 p_k - 1 keeps none.
    # (Also lam = 1 with a flat row: p_k - 1/V is exact, the form (p_k - 1) + (1 - 1/V) is not.)
    local = 70
    full = torch.zeros(3, local, dtype=torch.float64)
    full[0, 0] = 19.45
    full[1, 69] = 25.0
    target = torch.tensor([0, 69, 4])
    row_max, excess = global_stats(full)
    for lam in (0.0, 0.1, 1.0):
        grad = torch.empty(3, local, device=DEVICE)
        backend.shard_grad(
            full.float().to(DEVICE),
            target.to(DEVICE),
            0,
            local,
            row_max.float().to(DEVICE),
            excess.float().to(DEVICE),
            lam,
            -100,
            torch.tensor(1.0, device=DEVICE),
            grad,
        )
        _, ref = cross_entropy_reference(full, target, label_smoothing=lam, reduction="sum")
        torch.testing.assert_close(grad.cpu().double(), ref, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("option", ["weight", "z_loss", "softcap"])
def test_confident_target_column_recipe(backend, option):
    # The recipe's target column keeps a confident row's digits too: 1 - p_k taken as e / S (with a
    # cap of 30, z' = 30 tanh(z / 30) of 19.45 and 25 is still far above the zeros). M and e come from
    # the backend's own statistics of the whole row, as in a call: z'_k = M is then exact.
    local = 70
    full = torch.zeros(3, local, dtype=torch.float64)
    full[0, 0] = 19.45
    full[1, 69] = 25.0
    target = torch.tensor([0, 69, 4])
    weight = 0.5 + torch.arange(local, dtype=torch.float64) / local if option == "weight" else None
    z_loss = 1e-4 if option == "z_loss" else 0.0
    cap = 30.0 if option == "softcap" else None
    logits = full.float().to(DEVICE)
    recipe = Recipe(None if weight is None else weight.float().to(DEVICE), z_loss, cap)
    row_max, excess, _, _ = backend.shard_stats(logits, target.to(DEVICE), 0, 0.0, -100, recipe)
    z = full if cap is None else cap * torch.tanh(full / cap)
    extra = {"lse": torch.logsumexp(z, 1).float().to(DEVICE)}
    if weight is not None:
        extra.update(target_weight=weight[target].float().to(DEVICE), total_weight=weight.sum().float().to(DEVICE))
    for lam in (0.0, 0.1, 1.0):
        grad = torch.empty(3, local, device=DEVICE)
        args = (target.to(DEVICE), 0, local, row_max, excess, lam, -100, torch.tensor(1.0, device=DEVICE))
        backend.shard_grad(logits, *args, grad, recipe, **extra)
        options = {"label_smoothing": lam, "reduction": "sum", "z_loss": z_loss, "softcap": cap}
        _, ref = cross_entropy_reference(full, target, weight, **options)
        # atol: A p_j - (lam / V) w_j of the flat row's float32 p_j = 1/70 (at lam = 1 only the
        # z-loss's 1e-5 is left); the confident columns are ~1e-8 and must keep rtol's digits.
        torch.testing.assert_close(grad.cpu().double(), ref, rtol=1e-5, atol=2e-9)


def test_recipe_weight_of_the_wrong_size_is_a_clear_error(backend):
    logits = torch.randn(2, 5, device=DEVICE)
    target = torch.tensor([0, 1], device=DEVICE)
    recipe = Recipe(torch.ones(6, device=DEVICE), 0.0, None)
    with pytest.raises(ValueError, match=r"recipe.weight .* must be a \(5,\) tensor"):
        backend.shard_stats(logits, target, 0, 0.1, -100, recipe)
    row_max, excess = torch.zeros(2, device=DEVICE), torch.zeros(2, device=DEVICE)
    with pytest.raises(ValueError, match=r"target_weight must be a \(2,\) tensor"):
        backend.shard_grad(
            logits,
            target,
            0,
            5,
            row_max,
            excess,
            0.1,
            -100,
            torch.tensor(1.0, device=DEVICE),
            logits.clone(),
            Recipe(torch.ones(5, device=DEVICE), 0.0, None),
            None,
            torch.ones(3, device=DEVICE),
            torch.tensor(5.0),
        )


def test_no_rows(backend):
    logits = torch.empty(0, 5, device=DEVICE)
    target = torch.empty(0, dtype=torch.int64, device=DEVICE)
    assert backend.shard_stats(logits, target, 0, 0.1, -100).shape == (4, 0)
    grad = torch.empty_like(logits)
    empty = torch.empty(0, device=DEVICE)
    backend.shard_grad(logits, target, 0, 5, empty, empty, 0.1, -100, torch.tensor(1.0, device=DEVICE), grad)


def test_start_on_another_device_is_a_clear_error(backend):
    if DEVICE == "cpu":
        pytest.skip("needs a device other than the CPU")
    logits, target = torch.randn(2, 5, device=DEVICE), torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="start must be a Python int or a 0-d int64 tensor"):
        backend.shard_stats(logits, target, torch.tensor(0), 0.1, -100)


class _LaunchSpy:
    """Stands in for a kernel of triton_shard_kernels: records each launch's keyword arguments."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def _spy(monkeypatch):
    from smoothce.backends import triton_shard_kernels

    spies = {}
    for name in ("shard_stats_kernel", "shard_grad_kernel"):
        spies[name] = _LaunchSpy(getattr(triton_shard_kernels, name))
        monkeypatch.setattr(triton_shard_kernels, name, spies[name])
    return spies


@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_lanes_blocks_and_tail(backend, lam):
    # V_i = 40 in blocks of 16: lanes 0-7 see three values (the last in the masked tail), lanes 8-15 two.
    local = 40
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(9, local, generator=gen, dtype=torch.float64).clamp(-3.0, 3.0)
    rows[0, [3, 19]] = 7.0  # the max twice in one lane, in two blocks: R = 1 + the rest
    rows[1, [2, 9]] = 7.0  # the max twice in one block, two lanes
    rows[2, [11, 20, 36]] = 7.0  # three times: lanes 11, 4 and 4 again in the tail
    rows[3] = 0.0
    rows[3, 37] = 19.45  # confident, the max in the tail only: R = 39 exp(-19.45), never added to a 1
    rows[4] = float("-inf")
    rows[4, 21] = 2.5  # one finite value among -inf, in a full block: R = 0, t = -inf
    rows[5] = float("-inf")
    rows[5, 38] = -1.25  # ... and in the tail
    rows[6, [30, 33]] = 7.0  # the max in lane 14 (block 1) and lane 1 (the tail): lane 1 is the first
    rows[7, 0] = torch.finfo(torch.float32).min  # column 0 masked: not the reference of the sums
    rows[8] = 3e4 + rows[8]  # a large common offset: t keeps its digits
    rows = rows.float().double()
    # Targets in the slice (its logit is the reference of the sums) and outside it (column 0 is).
    target = torch.tensor([19, 50, -100, 37, 21, 45, 5, 60, 12])
    own = slice(0, local)
    logits = rows.to(DEVICE, torch.float32)
    stats = backend.shard_stats(logits, target.to(DEVICE), 0, lam, -100).cpu().double()
    torch.testing.assert_close(stats, true_stats(rows, target, own, lam), rtol=1e-6, atol=0.0)
    assert stats[:, 4].tolist() == [2.5, 0.0, float("-inf") if lam > 0 else 0.0, 2.5]
    assert stats[:, 5].tolist() == [-1.25, 0.0, float("-inf") if lam > 0 else 0.0, 0.0]


@pytest.mark.parametrize("lam", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_logit_makes_its_row_nan(backend, dtype, lam):
    # As F.cross_entropy: a NaN logit makes R (and t) of its row NaN, and so the row's loss; the
    # other rows keep their values. Ignored rows read nothing in shard_grad: zeros.
    local = 40
    full, target, own = make_rows(7, local, dtype)
    nan = float("nan")
    at = BEFORE
    full[0, at + 5] = nan  # in a full block, in a lane with other values
    full[1, at + 35] = nan  # in the tail
    target[1] = at + 20  # (make_rows ignores row 1)
    full[2, at + 12] = nan  # alone in its lane (lane 12: columns 12 and 28)
    full[2, at + 28] = float("-inf")
    full[3, at + 36] = nan  # after the lane's max (row 3's max is at columns 0 and 39)
    target[3] = 0  # outside the slice
    full[4, at + 7] = nan  # an ignored row
    target[4] = -100
    logits = full[:, own].to(DEVICE, dtype)
    stats = backend.shard_stats(logits, target.to(DEVICE), own.start, lam, -100).cpu().double()
    assert stats[1, :5].isnan().all()
    if lam > 0:
        assert stats[2, :5].isnan().all()
    expected = true_stats(full, target, own, lam)
    torch.testing.assert_close(stats[:, 5:], expected[:, 5:], **stats_tolerance(dtype))
    row_max, excess = global_stats(full[5:])
    acc = loss_dtype(dtype)
    row_max = torch.cat([torch.zeros(5, dtype=row_max.dtype), row_max]).to(DEVICE, acc)
    excess = torch.cat([torch.full((5,), nan, dtype=excess.dtype), excess]).to(DEVICE, acc)
    grad = torch.full_like(logits, nan)
    backend.shard_grad(
        logits,
        target.to(DEVICE),
        own.start,
        full.shape[1],
        row_max,
        excess,
        lam,
        -100,
        torch.tensor(1.0, dtype=acc, device=DEVICE),
        grad,
    )
    assert not grad[4].any()
    assert grad[:4].isnan().all()
    _, ref = cross_entropy_reference(full[5:], target[5:], label_smoothing=lam, reduction="sum")
    torch.testing.assert_close(grad[5:].cpu().double(), ref[:, own], **grad_tolerance(dtype))


def test_wide_column_offsets(backend, monkeypatch):
    # Column offsets are int64 where (V_i - 1) x a column stride reaches the single-process kernels'
    # threshold, lowered here to 100: (40 - 1) x 1 stays below it, (40 - 1) x 6 (transposed) does not.
    from smoothce.backends import triton_common

    monkeypatch.setattr(triton_common, "WIDE_OFFSETS", 100)
    spies = _spy(monkeypatch)
    full, target, own = make_rows(6, 40, torch.float32)
    contiguous = full[:, own].to(DEVICE, torch.float32)
    row_max, excess = (x.float().to(DEVICE) for x in global_stats(full))
    _, ref = cross_entropy_reference(full, target, label_smoothing=0.1, reduction="sum")
    one = torch.tensor(1.0, device=DEVICE)
    for logits, grad, wide_stats, wide_grad in [
        (contiguous, torch.empty_like(contiguous), False, False),
        (contiguous, _transposed(torch.empty_like(contiguous)), False, True),  # only the gradient's stride
        (_transposed(contiguous), torch.empty_like(contiguous), True, True),
    ]:
        stats = backend.shard_stats(logits, target.to(DEVICE), own.start, 0.1, -100)
        torch.testing.assert_close(
            stats.cpu().double(), true_stats(full, target, own, 0.1), **stats_tolerance(torch.float32)
        )
        backend.shard_grad(logits, target.to(DEVICE), own.start, full.shape[1], row_max, excess, 0.1, -100, one, grad)
        torch.testing.assert_close(grad.cpu().double(), ref[:, own], **grad_tolerance(torch.float32))
        assert spies["shard_stats_kernel"].launches[-1]["WIDE_COLS"] is wide_stats
        assert spies["shard_grad_kernel"].launches[-1]["WIDE_COLS"] is wide_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_fast_exp_only_in_float32_on_an_nvidia_gpu(monkeypatch, dtype):
    # A configuration asking for fast_exp (the CUDA backend's FAST_EXP) reaches the kernels as FAST_EXP
    # only in float32 accumulation on an NVIDIA GPU: never under the interpreter, which cannot run PTX.
    from smoothce.backends import triton_shard_kernels

    assert registry.get("xpu-triton").shard_launch_config(40, dtype)["fast_exp"] is False
    cuda = registry.get("cuda-triton")
    assert cuda.shard_launch_config(40, dtype)["fast_exp"] is (torch.version.hip is None)
    config = {"block": 16, "num_warps": 1, "fast_exp": True}
    spies = _spy(monkeypatch)
    full, target, own = make_rows(6, 40, dtype)
    logits = full[:, own].to(DEVICE, dtype)
    acc = loss_dtype(dtype)
    stats = triton_shard_kernels.shard_stats(logits, target.to(DEVICE), own.start, 0.1, -100, config)
    torch.testing.assert_close(stats.cpu().double(), true_stats(full, target, own, 0.1), **stats_tolerance(dtype))
    row_max, excess = (x.to(DEVICE, acc) for x in global_stats(full))
    grad = torch.empty_like(logits)
    triton_shard_kernels.shard_grad(
        logits,
        target.to(DEVICE),
        own.start,
        full.shape[1],
        row_max,
        excess,
        0.1,
        -100,
        torch.tensor(1.0, dtype=acc, device=DEVICE),
        grad,
        config,
    )
    _, ref = cross_entropy_reference(full, target, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(grad.cpu().double(), ref[:, own], **grad_tolerance(dtype))
    fast = DEVICE == "cuda" and torch.version.hip is None and dtype != torch.float64
    assert spies["shard_stats_kernel"].launches[-1]["FAST_EXP"] is fast
    assert spies["shard_grad_kernel"].launches[-1]["FAST_EXP"] is fast


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU the tests above compile the kernels")
@pytest.mark.timeout(600)
def test_kernels_compile_for_hopper():
    """Compile the real (not interpreted) kernels for sm_90 without a GPU, every switch that the
    interpreter leaves out: FAST_EXP's PTX (exp and bfloat16 widening) and the int64 column offsets.

    A fresh process, since TRITON_INTERPRET is read at import.
    """
    script = textwrap.dedent(
        """
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from smoothce.backends import triton_shard_kernels as sk

        # The recipe's arguments: None (constexpr) where its switch is off, as the launchers pass them.
        RECIPE_ARGS = ("weight_ptr", "weight_sum_ptr", "target_weight_ptr", "total_weight_ptr", "lse_ptr",
                       "cap_hi", "cap_lo", "icap_hi", "icap_lo", "zl_hi", "zl_lo")

        def compile_for_hopper(fn, constexprs, pointer, acc, recipe=False, **options):
            names = fn.arg_names
            constexprs = dict(constexprs)
            for name in ("SOFTCAP", "WEIGHTED", "ZLOSS"):
                if name in names:
                    constexprs.setdefault(name, recipe)
            if not recipe:
                constexprs.update((name, None) for name in RECIPE_ARGS if name in names)
            pointers = {"logits_ptr": pointer, "grad_ptr": pointer, "target_ptr": "*i64", "start": "*i64",
                        "num_classes": "*i64"}
            signature = {name: "constexpr" if name in constexprs else pointers.get(name, acc)
                         if name.endswith("_ptr") or name in ("start", "num_classes")
                         else "fp32" if name.endswith(("_hi", "_lo")) else "i32" for name in names}
            source = ASTSource(fn=fn, signature=signature,
                               constexprs={(names.index(k),): v for k, v in constexprs.items()})
            return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

        ptx = {}
        for pointer, acc, acc_dtype, fast, wide in (("*bf16", "*fp32", tl.float32, True, False),
                                                    ("*fp32", "*fp32", tl.float32, False, False),
                                                    ("*fp32", "*fp32", tl.float32, False, True),
                                                    ("*fp64", "*fp64", tl.float64, False, False)):
            common = dict(BLOCK_V=2048, START_IN_MEMORY=True, SMOOTHING=True, ACC_DTYPE=acc_dtype, FAST_EXP=fast,
                          WIDE_COLS=wide)
            for kernel, extra in ((sk.shard_stats_kernel, {}), (sk.shard_grad_kernel, {"V_IN_MEMORY": True})):
                constexprs = dict(common, **extra)
                ptx[kernel, pointer, wide] = compile_for_hopper(kernel, constexprs, pointer, acc, num_warps=8)
                # Every recipe switch on: class weights, the cap, the z-loss (issue 16).
                recipe = compile_for_hopper(kernel, constexprs, pointer, acc, recipe=True, num_warps=8)
                assert len(recipe) > len(ptx[kernel, pointer, wide]), "the recipe's switches change nothing"
        for kernel in (sk.shard_stats_kernel, sk.shard_grad_kernel):
            # int64 column offsets cannot be exercised without a 2**31-element tensor: at least they differ.
            assert ptx[kernel, "*fp32", True] != ptx[kernel, "*fp32", False], "WIDE_COLS changes nothing"
            assert "ex2.approx.ftz.f32" in ptx[kernel, "*bf16", False], "FAST_EXP takes no PTX exp"
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SMOOTHCE_BACKEND")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when it is unset
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.skipif(DEVICE != "cpu", reason="the GPU runs the vocabulary-parallel loss in test_distributed.py")
def test_vocab_parallel_loss_through_the_interpreter(tmp_path):
    # Two gloo ranks with SMOOTHCE_BACKEND=cuda-triton: vp_stats and vp_loss_grad run these kernels.
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    import _dist_worker

    results = _dist_worker.launch(2, ["triton_interpret"], timeout=280, tmp_path=tmp_path)
    failures = "\n".join(f"rank {rank}: {msg}" for rank, msgs in sorted(results.items()) for msg in msgs)
    assert not failures, f"failures through cuda-triton in the interpreter:\n{failures}"
