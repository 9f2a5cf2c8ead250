"""The CPU backend's recipe path (``backends/cpu_recipe.py``): class weights, z-loss, soft-capping and the
lse, against the float64 reference and no less accurate than PyTorch composing the same loss in fp32.

Every case runs twice: on the compiled kernel (``cpu_kernel``, one fused loop per row) and on the
vectorized-torch blocks it falls back to where no compiler is (``SMOOTHCE_CPU_KERNEL=0``). Each calls
``CpuBackend.forward_recipe`` (the rows, the gradient and the lse) with small blocks, so that the torch
path cuts rows into many blocks, a row can be a block of its own (V above the block size), and two
worker threads share them (the kernel's rows too); the op-level cases go through
``CpuBackend.loss_and_grad``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, cpu_kernel_library, make_logits, make_target

import smoothce
from smoothce.backends import cpu_kernel
from smoothce.backends.base import Recipe
from smoothce.backends.cpu import CpuBackend
from smoothce.backends.cpu_recipe import BLOCK_DIVISOR, block_budget
from smoothce.numerics import loss_dtype
from smoothce.reference import cross_entropy_reference

# Options: each alone and all together (z_loss 1e-2 so that its share of the loss and gradient shows).
OPTIONS = {
    "weight": dict(weight=True),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=5.0),
    "all": dict(weight=True, z_loss=1e-2, softcap=30.0),
}
# (rows, V, rows per block, torch threads): the float64 copy of a small input (<= 8192 logits, no
# blocks); 37 rows in blocks of 2 (odd V) shared by two worker threads; a V above the block size (a row
# per block); blocks of 8 rows in one thread.
SHAPES = [(6, 50, None, 1), (37, 701, 2, 2), (5, 3001, 1, 1), (64, 1000, 8, 1)]
SCALE = 1.0 / 7.0


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def path(request, monkeypatch):
    """The compiled kernel (required to build where SMOOTHCE_REQUIRE_CPU_KERNEL=1), or the torch blocks."""
    if request.param == "kernel":
        cpu_kernel_library()
    else:
        monkeypatch.setenv("SMOOTHCE_CPU_KERNEL", "0")
    return request.param


def class_weight(num_classes, dtype, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(num_classes, generator=generator, dtype=torch.float64) + 0.5).to(loss_dtype(dtype))


def blocked_backend(n_rows, num_classes, rows_per_block, workers):
    """A CpuBackend whose recipe blocks hold ``rows_per_block`` rows (1: fewer elements than a row) and
    are shared by ``workers`` threads (with that many torch threads)."""
    budget = rows_per_block * num_classes * workers - (num_classes // 2 if rows_per_block == 1 else 0)
    backend = CpuBackend(block_elements=budget * (BLOCK_DIVISOR if workers == 1 else 1))
    assert backend._block_rows(n_rows, num_classes, block_budget(backend)) == (workers, rows_per_block)
    return backend


def recipe_of(options, num_classes, dtype):
    weight = class_weight(num_classes, dtype) if options.get("weight") else None
    return Recipe(weight, options.get("z_loss", 0.0), options.get("softcap"))


def run_backend(backend, logits, target, lam, recipe, grad="fresh"):
    """(loss, grad, lse) of ``forward_recipe`` with grad_scale ``SCALE``; ``grad`` "fresh", "strided",
    "aliased" (written over a copy of the logits) or None."""
    acc = loss_dtype(logits.dtype)
    if grad == "fresh":
        grad = torch.full_like(logits, math.nan)
    elif grad == "strided":
        grad = torch.full(logits.shape[::-1], math.nan, dtype=logits.dtype).t()
    elif grad == "aliased":
        logits = grad = logits.clone()
    lse = torch.full((logits.shape[0],), math.nan, dtype=acc)
    loss = backend.forward_recipe(logits, target, lam, -100, grad, torch.tensor(SCALE, dtype=acc), recipe, lse)
    return loss, grad, lse


def reference(logits, target, lam, recipe):
    """The float64 reference's (loss, grad x SCALE, lse), rows as "none"."""
    loss, grad, lse = cross_entropy_reference(
        logits,
        target,
        recipe.weight,
        label_smoothing=lam,
        reduction="none",
        z_loss=recipe.z_loss,
        softcap=recipe.softcap,
        return_lse=True,
    )
    return loss, grad * SCALE, lse


def pytorch_fp32(logits, target, lam, recipe):
    """PyTorch composing the same loss on the logits in fp32 (its own fp32 path), autograd backward:
    (loss, grad x SCALE rounded to the logits' dtype, lse)."""
    z = logits.detach().float().requires_grad_(True)
    capped = z if recipe.softcap is None else recipe.softcap * torch.tanh(z / recipe.softcap)
    weight = None if recipe.weight is None else recipe.weight.float()
    rows = F.cross_entropy(capped, target, weight, label_smoothing=lam, reduction="none")
    lse = torch.logsumexp(capped, 1)
    if recipe.z_loss:
        valid = target != -100
        w_k = 1.0 if weight is None else weight[target.clamp_min(0)]
        rows = rows + torch.where(valid, recipe.z_loss * w_k * lse.square(), 0.0)
    rows.sum().backward()
    return rows.detach(), (z.grad * SCALE).to(logits.dtype), lse.detach()


def max_error(value, ref):
    return float((value.double() - ref).abs().max()) if ref.numel() else 0.0


def assert_as_accurate_as_pytorch(ours, logits, target, lam, recipe):
    """Loss, gradient (None: not asked for) and lse: float64 logits to ~1e-13 of the reference; others no
    further from it than twice PyTorch's own fp32 composition on the same inputs, plus a few fp32 ulps of
    the largest value."""
    ref = reference(logits, target, lam, recipe)
    names = ("loss", "grad", "lse")
    if logits.dtype == torch.float64:
        for name, value, expected in zip(names, ours, ref, strict=True):
            if value is None:
                continue
            scale = float(expected.abs().max()) if expected.numel() else 0.0
            error = max_error(value, expected)
            assert error <= 2e-13 * scale + 1e-300, f"{name}: error {error:.2e} of {scale:.2e}"
        return
    theirs = pytorch_fp32(logits, target, lam, recipe)
    for name, value, mine_ref, them in zip(names, ours, ref, theirs, strict=True):
        if value is None:
            continue
        bound = 2.0 * max_error(them, mine_ref) + 4 * 2.0**-24 * float(mine_ref.abs().max())
        error = max_error(value, mine_ref)
        assert error <= bound, f"{name}: error {error:.3e}, PyTorch's {max_error(them, mine_ref):.3e}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:2])))
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_recipe_rows(dtype, option, label_smoothing, shape):
    n_rows, num_classes, rows_per_block, threads = shape
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        backend = CpuBackend() if rows_per_block is None else blocked_backend(*shape)
        logits = make_logits((n_rows, num_classes), dtype)
        target = make_target((n_rows,), num_classes)
        target[0], target[-1] = -100, num_classes - 1  # an ignored row, the last class
        recipe = recipe_of(OPTIONS[option], num_classes, dtype)
        ours = run_backend(backend, logits, target, label_smoothing, recipe)
    finally:
        torch.set_num_threads(before)
    assert ours[0].dtype == ours[2].dtype == loss_dtype(dtype)
    assert ours[1].dtype == dtype
    assert_as_accurate_as_pytorch(ours, logits, target, label_smoothing, recipe)


@pytest.mark.parametrize("layout", ["strided", "aliased", "no-grad", "strided-logits"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts(dtype, layout):
    # A strided gradient goes through the scratch block; one written over its own logits (the fused
    # linear loss) may read nothing after the blocks; without a gradient the loss and lse alone; and
    # logits with a column stride (a transposed tensor).
    backend = CpuBackend(block_elements=1 << 13)  # (blocks of a few rows)
    logits = make_logits((37, 701), dtype)
    target = make_target((37,), 701)
    recipe = recipe_of(OPTIONS["all"], 701, dtype)
    if layout == "strided-logits":
        logits = logits.t().contiguous().t()
    grad = {"no-grad": None, "strided-logits": "fresh"}.get(layout, layout)
    ours = run_backend(backend, logits, target, 0.1, recipe, grad)
    assert_as_accurate_as_pytorch(ours, logits, target, 0.1, recipe)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cap", [None, 30.0])
def test_every_row_ignored(dtype, cap):
    # Loss 0 and a zero gradient on every row, and still the lse of each.
    backend = CpuBackend(block_elements=1 << 13)  # (blocks of a few rows)
    logits = make_logits((40, 700), dtype)
    target = torch.full((40,), -100)
    recipe = Recipe(class_weight(700, dtype), 1e-2, cap)
    loss, grad, lse = run_backend(backend, logits, target, 0.1, recipe)
    assert bool((loss == 0).all())
    assert bool((grad == 0).all())
    _, _, ref_lse = reference(logits, target, 0.1, recipe)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6 if dtype != torch.float64 else 1e-14, atol=0)


@pytest.mark.parametrize("n_rows", [3, 9000], ids=["small", "blocked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_class(dtype, n_rows):
    # V = 1: p = 1, lse = z', the loss is the z-loss alone and the gradient 2 s w lse (1 - t^2).
    backend = CpuBackend(block_elements=1 << 10)  # (blocks of 512 rows of one class)
    logits = make_logits((n_rows, 1), dtype)
    target = torch.zeros(n_rows, dtype=torch.long)
    recipe = Recipe(torch.full((1,), 0.75, dtype=loss_dtype(dtype)), 0.1, 4.0)
    ours = run_backend(backend, logits, target, 0.1, recipe)
    assert_as_accurate_as_pytorch(ours, logits, target, 0.1, recipe)


@pytest.mark.parametrize("option", ["weight", "all"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shared_offset(dtype, option):
    # Logits sharing +1e4 (before the cap, which saturates to c; without one, everything is relative to
    # the row max, so no digit of the smoothing term's sum is lost).
    backend = CpuBackend(block_elements=1 << 13)  # (blocks of a few rows)
    logits = (make_logits((37, 701), torch.float64) + 1e4).to(dtype)
    target = make_target((37,), 701)
    recipe = recipe_of(OPTIONS[option], 701, dtype)
    ours = run_backend(backend, logits, target, 0.1, recipe)
    assert_as_accurate_as_pytorch(ours, logits, target, 0.1, recipe)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_confident_rows(dtype):
    # Targets 30 above the rest under a cap of 50: 1 - p_k ~ 1e-13 lies far below the ulp of 1, and the
    # target column's gradient keeps its digits (PyTorch's fp32 p_k - 1 keeps none of them).
    backend = CpuBackend(block_elements=1 << 13)  # (blocks of a few rows)
    logits = make_logits((37, 701), dtype)
    target = make_target((37,), 701, ignore_fraction=0.0)
    rows = torch.arange(37)
    logits[rows, target] = (logits.double().amax(1) + 30.0).to(dtype)
    recipe = Recipe(class_weight(701, dtype), 1e-3, 50.0)
    for lam in (0.0, 0.1):
        ours = run_backend(backend, logits, target, lam, recipe)
        assert_as_accurate_as_pytorch(ours, logits, target, lam, recipe)
    if dtype == torch.float16:
        return  # (-w_k (1 - p_k) ~ -1e-13 is below fp16's smallest subnormal)
    # Without smoothing and z-loss the target's entry is -w_k (1 - p_k) (1 - t_k^2), 1 - p_k = q / (1 + q)
    # with q = sum_{j != k} exp(z'_j - z'_k) (z'_k the max; the reference's p_k - 1 loses these digits
    # even in float64): right to its own rounding, where p_k - 1 in the working precision gives 0.
    recipe = recipe._replace(z_loss=0.0)
    _, grad, _ = run_backend(backend, logits, target, 0.0, recipe)
    t = torch.tanh(logits.double() / recipe.softcap)
    capped = recipe.softcap * t
    q = (
        (capped - capped[rows, target].unsqueeze(1))
        .exp()
        .index_put_((rows, target), torch.zeros((), dtype=torch.float64))
        .sum(1)
    )
    w_k = recipe.weight.double()[target]
    ref_entry = -w_k * (q / (1.0 + q)) * (1.0 - t[rows, target].square()) * SCALE
    entry = grad[rows, target].double()
    assert bool((ref_entry < 0).all())
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(entry, ref_entry, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_negative_infinite_logits(dtype):
    # -inf logits: with a cap they become -c; without one they add nothing at lam = 0 (loss finite) and a
    # target on one has loss +inf, whatever the options (no inf - inf).
    backend = CpuBackend(block_elements=1 << 13)  # (blocks of a few rows)
    logits = make_logits((37, 701), dtype)
    target = make_target((37,), 701, ignore_fraction=0.0)
    logits[:, ::3] = -math.inf
    target[1:] = target[1:] // 3 * 3 + 1  # every target but row 0's on a finite column
    target[0] = 0
    weight = class_weight(701, dtype)
    for recipe, lam in ((Recipe(weight, 1e-2, 30.0), 0.1), (Recipe(weight, 1e-2, None), 0.0)):
        loss, grad, lse = run_backend(backend, logits, target, lam, recipe)
        ref_loss, ref_grad, ref_lse = reference(logits, target, lam, recipe)
        if recipe.softcap is None:
            assert loss[0] == math.inf
            loss, grad, ref_loss, ref_grad = loss[1:], grad[1:], ref_loss[1:], ref_grad[1:]
        assert bool(torch.isfinite(loss).all())
        assert bool(torch.isfinite(grad).all())
        rtol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=0)
        torch.testing.assert_close(lse.double(), ref_lse, rtol=rtol, atol=0)
        atol = float(ref_grad.abs().max()) * (1e-13 if dtype == torch.float64 else 2.0**-7)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_wide_rows_of_a_wider_tensor(dtype):
    # V = 70001 (many of the kernel's 1024-column sums, an odd tail) in rows of a wider tensor (a row
    # stride above V), shared by two threads.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        logits = make_logits((9, 70011), dtype)[:, :70001]
        target = make_target((9,), 70001)
        target[0] = 70000  # the last class
        recipe = recipe_of(OPTIONS["all"], 70001, dtype)
        ours = run_backend(CpuBackend(), logits, target, 0.1, recipe)
    finally:
        torch.set_num_threads(before)
    assert_as_accurate_as_pytorch(ours, logits, target, 0.1, recipe)


@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_logits(dtype, cap):
    # A NaN logit makes its row's loss, lse and gradient NaN, and no other row's.
    logits = make_logits((37, 701), dtype)
    logits[3, 5] = math.nan
    target = make_target((37,), 701, ignore_fraction=0.0)
    loss, grad, lse = run_backend(CpuBackend(), logits, target, 0.1, Recipe(class_weight(701, dtype), 1e-2, cap))
    others = torch.arange(37) != 3
    for value in (loss, lse, grad):
        assert bool(value[3].isnan().all())
        assert bool(value[others].isfinite().all())


def test_no_rows():
    # N = 0 (a fused linear loss's empty chunk, a direct caller): an empty loss, nothing written.
    logits = torch.empty((0, 11))
    loss = CpuBackend().forward_recipe(
        logits, torch.empty(0, dtype=torch.long), 0.1, -100, logits, torch.tensor(1.0), Recipe(None, 1e-3, 5.0)
    )
    assert loss.shape == (0,)


@pytest.mark.parametrize("path", ["torch"], indirect=True)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_scratch_blocks_no_larger_than_the_plain_loss(monkeypatch, dtype, threads, path):
    # With every option on, each scratch block _run_blocks allocates holds no more values than the plain
    # loss's one block for bfloat16 logits, and there are at most two (a cap's t, a half gradient's block).
    # (The kernel's scratch: test_kernel_scratch_is_a_row_or_two; float64 always takes these blocks.)
    allocated = []
    run_blocks = CpuBackend._run_blocks

    def recording(self, block, n_rows, num_classes, acc, buffers=None, block_elements=None):
        workers, rows = self._block_rows(n_rows, num_classes, block_elements)
        allocated.append((0 if acc is None else buffers or 1, workers * rows * num_classes))
        return run_blocks(self, block, n_rows, num_classes, acc, buffers, block_elements)

    monkeypatch.setattr(CpuBackend, "_run_blocks", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        backend = CpuBackend(block_elements=1 << 14)  # (blocks of a few rows, two workers on two threads)
        target = make_target((256,), 1000)
        scale = torch.tensor(SCALE)
        plain = make_logits((256, 1000), torch.bfloat16)
        backend.forward(plain, target, 0.1, -100, torch.empty_like(plain), scale)
        logits = make_logits((256, 1000), dtype)
        recipe = recipe_of(OPTIONS["all"], 1000, dtype)
        backend.forward_recipe(logits, target, 0.1, -100, torch.empty_like(logits), scale.to(logits.dtype), recipe)
    finally:
        torch.set_num_threads(before)
    (plain_buffers, plain_block), (buffers, block) = allocated
    assert plain_buffers == 1
    assert buffers == (2 if dtype == torch.bfloat16 else 1)
    assert block <= plain_block


@pytest.mark.parametrize("path", ["kernel"], indirect=True)
@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_scratch_is_a_row_or_two(monkeypatch, dtype, cap, path):
    # The kernel's rows: each worker thread's scratch is a row of fp32 with a cap (t) and one for a half
    # gradient (e), each with room to place it (PLACES); no block of the logits' size.
    sizes, scratch = [], cpu_kernel.scratch
    monkeypatch.setattr(
        cpu_kernel, "scratch", lambda rows, num_classes: sizes.append(rows) or scratch(rows, num_classes)
    )
    calls, recipe_rows = [], cpu_kernel.recipe_rows
    monkeypatch.setattr(cpu_kernel, "recipe_rows", lambda *args: calls.append(1) or recipe_rows(*args))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        logits = make_logits((256, 1000), dtype)
        recipe = Recipe(class_weight(1000, dtype), 1e-3, cap)
        ours = run_backend(CpuBackend(), logits, make_target((256,), 1000), 0.1, recipe)
    finally:
        torch.set_num_threads(before)
    assert calls == [1]  # the kernel served the call
    rows = (cap is not None) + (dtype != torch.float32)
    assert sizes == ([rows] * 2 if rows else [])  # a worker each (two threads); fp32 without a cap: none
    assert_as_accurate_as_pytorch(ours, logits, make_target((256,), 1000), 0.1, recipe)


def test_plain_recipe_is_the_plain_path():
    # Every option off and no lse asked for: forward_recipe is forward, bit for bit.
    backend = CpuBackend(block_elements=1 << 13)
    logits = make_logits((37, 701), torch.bfloat16)
    target = make_target((37,), 701)
    scale = torch.tensor(SCALE)
    grad, plain_grad = torch.empty_like(logits), torch.empty_like(logits)
    loss = backend.forward_recipe(logits, target, 0.1, -100, grad, scale, Recipe())
    plain = backend.forward(logits, target, 0.1, -100, plain_grad, scale)
    assert torch.equal(loss, plain)
    assert torch.equal(grad, plain_grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_through_the_op(dtype, reduction):
    # smoothce.cross_entropy on CPU: CpuBackend.loss_and_grad's own recipe path (the weighted mean's
    # denominator read on the host), loss, gradient and lse against the reference.
    logits = make_logits((4, 9, 3001), dtype)
    target = make_target((4, 9), 3001)
    weight = class_weight(3001, torch.float32)
    options = dict(label_smoothing=0.1, reduction=reduction, z_loss=1e-3, softcap=20.0)
    leaf = logits.clone().requires_grad_(True)
    loss, lse = smoothce.cross_entropy(leaf, target, weight, return_lse=True, **options)
    loss.backward(torch.ones_like(loss))
    ref_loss, ref_grad, ref_lse = cross_entropy_reference(logits, target, weight, return_lse=True, **options)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=1e-6 * rtol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=rtol, atol=0)
    grad_rtol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float64: 1e-12}[dtype]
    atol = float(ref_grad.abs().max()) * (1e-13 if dtype == torch.float64 else 4e-6)
    torch.testing.assert_close(leaf.grad.double(), ref_grad, rtol=grad_rtol, atol=atol)


def test_zero_weight_on_every_target():
    # "mean" over targets whose weights are all 0: loss 0 and a zero gradient (PyTorch: NaN).
    logits = make_logits((16, 3001), torch.float32).requires_grad_(True)
    target = make_target((16,), 3001, ignore_fraction=0.0)
    weight = class_weight(3001, torch.float32)
    weight[target] = 0.0
    loss = smoothce.cross_entropy(logits, target, weight, label_smoothing=0.1, z_loss=1e-3, softcap=30.0)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert bool((logits.grad == 0).all())
