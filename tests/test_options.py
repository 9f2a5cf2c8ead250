"""The recipe options of smoothce.cross_entropy (class weights, z-loss, soft-capping, lse) against float64.

Two references that can fail us: ``cross_entropy_reference`` written from the spec, and PyTorch
composed in float64, F.cross_entropy(c tanh(z / c), k, w, label_smoothing) + s w_k lse^2. Accuracy
is held to PyTorch's own: on the same inputs, our error against float64 may be at most twice that
of PyTorch composing the loss in float32 (plus the rounding of a kept half-precision gradient).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, DTYPES, INTERPRETED_TRITON, cap_triton_blocks, make_logits, make_target
from torch._dynamo.testing import CompileCounterWithBackend

import smoothce
from smoothce.backends import torch_defaults
from smoothce.backends.base import Backend, Recipe
from smoothce.reference import cross_entropy_reference

# Each option alone and all together; "lse" asks for the log-sum-exp only.
OPTION_SETS = {
    "weight": dict(weight=True),
    "z_loss": dict(z_loss=1e-3),
    "softcap": dict(softcap=5.0),
    "lse": dict(return_lse=True),
    "all": dict(weight=True, z_loss=1e-2, softcap=5.0, return_lse=True),
}
# 1: a single class; 40: under the Triton test cap three blocks, the last masked; 1000: one long
# masked row; 4099: odd, above 4096 (the CPU backend's blocks meet it). Under the interpreter, where
# every launch costs milliseconds, the rows of up to 40 (test_triton_kernels.py has the kernels' grid).
VOCAB = [1, 40] if INTERPRETED_TRITON else [1, 40, 1000, 4099]


def class_weights(num_classes, seed=3, dtype=torch.float32):
    """Positive weights in [0.25, 2), one class weighted 0 where there are several."""
    generator = torch.Generator().manual_seed(seed)
    weight = (0.25 + 1.75 * torch.rand(num_classes, generator=generator, dtype=torch.float64)).to(dtype)
    if num_classes > 2:
        weight[1] = 0.0
    return weight


def resolve(options, num_classes):
    """The option set with ``weight=True`` replaced by class weights."""
    options = dict(options)
    if options.get("weight") is True:
        options["weight"] = class_weights(num_classes)
    return options


def torch_composed(
    logits,
    target,
    weight=None,
    *,
    label_smoothing=0.0,
    reduction="mean",
    z_loss=0.0,
    softcap=None,
    ignore_index=-100,
    dtype=torch.float64,
):
    """(loss, grad, lse) of PyTorch composing the loss in ``dtype``, autograd for the gradient."""
    z = logits.detach().to(dtype).requires_grad_(True)
    capped = softcap * torch.tanh(z / softcap) if softcap is not None else z
    w = None if weight is None else weight.to(dtype)
    rows = F.cross_entropy(
        capped.reshape(-1, z.shape[-1]),
        target.reshape(-1),
        w,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction="none",
    ).reshape(target.shape)
    lse = torch.logsumexp(capped, -1)
    valid = target != ignore_index
    w_k = torch.ones_like(rows) if w is None else w[torch.where(valid, target, 0)]
    w_k = torch.where(valid, w_k, 0.0)
    if z_loss:
        rows = rows + z_loss * w_k * lse.square()
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        total = w_k.sum()
        loss = rows.sum() / total if float(total) > 0 else rows.sum() * 0.0
    (grad,) = torch.autograd.grad(loss.sum(), z, allow_unused=True)
    return loss.detach(), (torch.zeros_like(z) if grad is None else grad), lse.detach()


def run(logits, target, upstream=None, **options):
    """(loss, grad, lse or None) from smoothce.cross_entropy on DEVICE, backward of dO = ``upstream`` (ones)."""
    leaf = logits.detach().to(DEVICE, copy=True).requires_grad_(True)
    if isinstance(options.get("weight"), torch.Tensor):
        options["weight"] = options["weight"].to(DEVICE)
    out = smoothce.cross_entropy(leaf, target.to(DEVICE), **options)
    loss, lse = out if options.get("return_lse") else (out, None)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream.to(DEVICE, loss.dtype))
    return loss.detach().cpu(), leaf.grad.cpu(), None if lse is None else lse.cpu()


def max_error(value, exact):
    """The largest |value - exact|, inf where exactly one of them is not finite at a position."""
    value, exact = value.double(), exact.double()
    both = torch.isfinite(value) & torch.isfinite(exact)
    same = (value == exact) | (value.isnan() & exact.isnan())
    if bool((~both & ~same).any()):
        return math.inf
    return float((value - exact)[both].abs().max()) if bool(both.any()) else 0.0


def assert_as_accurate_as_pytorch(logits, target, loss, grad, lse=None, upstream=None, **options):
    """Ours against float64: within twice PyTorch's float32 composition's error, or the dtype's rounding."""
    options = {k: v for k, v in options.items() if k != "return_lse"}
    exact = cross_entropy_reference(logits, target, **options, return_lse=True)
    composed = torch_composed(logits, target, **options)
    torch.testing.assert_close(exact[0], composed[0], rtol=1e-12, atol=1e-12)  # the two references agree
    torch.testing.assert_close(exact[1], composed[1], rtol=1e-10, atol=1e-13)
    fp32 = torch_composed(
        logits, target, **options, dtype=torch.float32 if logits.dtype != torch.float64 else torch.float64
    )
    ref_grad = exact[1]
    if upstream is not None:
        ref_grad = ref_grad * (upstream.double().unsqueeze(-1) if upstream.dim() else upstream.double())
        fp32 = (
            fp32[0],
            fp32[1].double() * (upstream.double().unsqueeze(-1) if upstream.dim() else upstream.double()),
            fp32[2],
        )
    scale = float(ref_grad.abs().max()) if ref_grad.numel() else 0.0
    tiny = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}[logits.dtype]
    loss_budget = 2 * max_error(fp32[0], exact[0]) + tiny * (1 + float(exact[0].abs().max()) if exact[0].numel() else 1)
    assert loss.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert loss.shape == exact[0].shape
    assert max_error(loss, exact[0]) <= loss_budget, (max_error(loss, exact[0]), loss_budget)
    # A kept half-precision gradient is rounded once: half an ulp of each element on top (and half
    # the spacing of float16's subnormals, 2**-25, for the smallest).
    ulp = {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[logits.dtype]
    tiny = tiny + (2.0**-25 / scale if logits.dtype == torch.float16 and scale > 0 else 0.0)
    if upstream is not None and not bool((torch.frexp(upstream.double())[0].abs() == 0.5).all()):
        ulp *= 2  # dO not a power of two: the kept gradient is rounded, then its product (numerics.py)
    assert grad.dtype == logits.dtype
    assert grad.shape == logits.shape
    error = (grad.double() - ref_grad).abs()
    budget = 2 * max_error(fp32[1], ref_grad) + tiny * scale + ulp * ref_grad.abs()
    assert bool((error <= budget).all()), float((error - budget).max())
    if lse is not None:
        assert lse.dtype == loss.dtype
        assert lse.shape == target.shape
        lse_budget = 2 * max_error(fp32[2], exact[2]) + tiny * (1 + float(exact[2].abs().max()))
        assert max_error(lse, exact[2]) <= lse_budget, (max_error(lse, exact[2]), lse_budget)


@pytest.mark.parametrize("num_classes", VOCAB)
@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_options_match_float64(dtype, reduction, label_smoothing, options, num_classes, monkeypatch):
    cap_triton_blocks(monkeypatch)
    rows = 6
    logits = make_logits((rows, num_classes), dtype, seed=num_classes)
    target = make_target((rows,), num_classes, seed=num_classes)
    target[0] = num_classes - 1  # the last class
    target[1] = -100  # an ignored row
    target[2] = num_classes // 2
    logits[2, target[2]] += 14.0  # a confident row: 1 - p_k far below the ulp of 1
    options = resolve(options, num_classes)
    upstream = torch.exp2(torch.arange(rows) % 3 - 1.0) if reduction == "none" else None
    loss, grad, lse = run(logits, target, upstream, label_smoothing=label_smoothing, reduction=reduction, **options)
    assert_as_accurate_as_pytorch(
        logits, target, loss, grad, lse, upstream, label_smoothing=label_smoothing, reduction=reduction, **options
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_offsets_softcap_bounds_them(dtype):
    # A shared offset of 1e4 (float32's ulp there is 1e-3): capped at 30 every logit is ~30, and
    # the loss and gradient are those of the capped row, which the reference computes the same way.
    logits = make_logits((5, 300), torch.float32) + 1e4
    logits = logits.to(dtype)
    target = make_target((5,), 300)
    options = dict(softcap=30.0, label_smoothing=0.1, z_loss=1e-4, weight=class_weights(300))
    loss, grad, _ = run(logits, target, **options)
    assert torch.isfinite(loss).all()
    assert torch.isfinite(grad).all()
    assert_as_accurate_as_pytorch(logits, target, loss, grad, **options)


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_neg_inf_logits(options, monkeypatch):
    # -inf logits off the target: probability 0; with a cap they become -c, finite. The smoothing
    # term would be inf, so lam = 0 here (as PyTorch: a -inf logit at lam > 0 gives an inf loss).
    cap_triton_blocks(monkeypatch)
    logits = make_logits((4, 37), torch.float32)
    target = make_target((4,), 37, ignore_fraction=0.0)
    logits[:, 5] = -math.inf
    target[target == 5] = 6
    options = resolve(options, 37)
    loss, grad, lse = run(logits, target, **options)
    assert torch.isfinite(loss).all()
    assert torch.isfinite(grad).all()
    assert_as_accurate_as_pytorch(logits, target, loss, grad, lse, **options)
    assert bool((grad[:, 5] == 0).all())


@pytest.mark.parametrize("case", ["all_ignored", "zero_weights"])
def test_weighted_mean_of_nothing_is_zero(case):
    # Where the sum of w_k over counted rows is 0, "mean" is 0 with a zero gradient (PyTorch: NaN).
    logits = make_logits((4, 10), torch.float32)
    weight = torch.ones(10)
    if case == "all_ignored":
        target = torch.full((4,), -100)
    else:
        target = torch.tensor([2, 2, 7, -100])
        weight[[2, 7]] = 0.0
    loss, grad, _ = run(logits, target, weight=weight, label_smoothing=0.1, z_loss=1e-3)
    assert float(loss) == 0.0
    assert bool((grad == 0).all())
    assert math.isnan(float(F.cross_entropy(logits, target, weight, label_smoothing=0.1)))  # PyTorch's NaN


def test_lse_is_every_rows_and_has_no_gradient():
    logits = make_logits((2, 3, 50), torch.float32).requires_grad_(True)
    target = make_target((2, 3), 50)
    target[0, 0] = -100
    loss, lse = smoothce.cross_entropy(logits, target, label_smoothing=0.1, softcap=4.0, return_lse=True)
    assert lse.shape == (2, 3)
    assert lse.dtype == torch.float32
    assert not lse.requires_grad
    exact = torch.logsumexp(4.0 * torch.tanh(logits.detach().double() / 4.0), -1)
    torch.testing.assert_close(lse.double(), exact, rtol=1e-6, atol=1e-6)  # the ignored row's too
    loss.backward()
    assert logits.grad is not None
    _, lse64 = smoothce.cross_entropy(logits.detach().double(), target, return_lse=True)
    assert lse64.dtype == torch.float64
    torch.testing.assert_close(lse64, torch.logsumexp(logits.detach().double(), -1), rtol=1e-14, atol=0)


def test_defaults_are_the_plain_op():
    # Every option at its default is the plain op, bit for bit; weights of ones are the same loss.
    logits = make_logits((9, 333), torch.bfloat16)
    target = make_target((9,), 333)
    plain = run(logits, target, label_smoothing=0.1)
    explicit = run(logits, target, None, label_smoothing=0.1, weight=None, z_loss=0.0, softcap=None)
    assert torch.equal(plain[0], explicit[0])
    assert torch.equal(plain[1], explicit[1])
    ones = run(logits, target, label_smoothing=0.1, weight=torch.ones(333))
    torch.testing.assert_close(ones[0], plain[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ones[1].float(), plain[1].float(), rtol=2.0**-7, atol=1e-6)


def test_leading_dims_and_non_contiguous_logits():
    base = make_logits((3, 60, 4), torch.float32)
    logits = base.transpose(1, 2)  # (3, 4, 60), the class dimension strided
    assert not logits.is_contiguous()
    target = make_target((3, 4), 60)
    options = dict(weight=class_weights(60), z_loss=1e-3, softcap=3.0, label_smoothing=0.1, return_lse=True)
    for reduction in ("mean", "none"):
        loss, grad, lse = run(logits, target, reduction=reduction, **options)
        assert_as_accurate_as_pytorch(logits, target, loss, grad, lse, reduction=reduction, **options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_kept_half_gradient_survives_a_loss_scale_and_accumulation(dtype):
    # GradScaler's 65536 and an accumulation window's 1/3: the kept gradient is scaled once.
    logits = make_logits((64, 500), dtype)
    target = make_target((64,), 500)
    options = dict(weight=class_weights(500), z_loss=1e-3, softcap=20.0, label_smoothing=0.1)
    for upstream in (torch.tensor(65536.0), torch.tensor(1.0 / 3.0)):
        loss, grad, _ = run(logits, target, upstream, **options)
        assert torch.isfinite(grad).all()
        assert_as_accurate_as_pytorch(logits, target, loss, grad, upstream=upstream, **options)


def test_module_keeps_weight_as_buffer():
    weight = class_weights(30)
    module = smoothce.CrossEntropyLoss(weight, label_smoothing=0.1, z_loss=1e-3, softcap=10.0)
    assert torch.equal(module.state_dict()["weight"], weight)
    assert "z_loss=0.001" in repr(module)
    assert "softcap=10.0" in repr(module)
    module = module.double()
    assert module.weight.dtype == torch.float64
    logits = make_logits((5, 30), torch.float64).requires_grad_(True)
    target = make_target((5,), 30)
    module(logits, target).backward()
    exact = cross_entropy_reference(logits, target, weight, label_smoothing=0.1, z_loss=1e-3, softcap=10.0)
    torch.testing.assert_close(logits.grad, exact[1], rtol=1e-10, atol=1e-14)
    plain = smoothce.CrossEntropyLoss()
    assert plain.weight is None
    assert "weight" not in plain.state_dict()


def test_raw_op_takes_weight_positionally():
    logits = make_logits((4, 12), torch.float32)
    target = make_target((4,), 12)
    weight = class_weights(12)
    loss = torch.ops.smoothce.cross_entropy(logits, target, weight, label_smoothing=0.1, z_loss=1e-3, softcap=2.0)
    _loss_lse, lse = torch.ops.smoothce.cross_entropy_lse(logits, target, weight, label_smoothing=0.1, softcap=2.0)
    exact = cross_entropy_reference(logits, target, weight, label_smoothing=0.1, z_loss=1e-3, softcap=2.0)
    torch.testing.assert_close(loss.double(), exact[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), torch.logsumexp(2.0 * torch.tanh(logits.double() / 2.0), -1))


def _bad(logits, target):
    return [
        (dict(weight=torch.ones(11)), ValueError, r"weight must have shape \(12,\).*got shape \(11,\)"),
        (dict(weight=torch.ones(2, 12)), ValueError, r"weight must have shape \(12,\)"),
        (
            dict(weight=torch.ones(12, dtype=torch.int64)),
            TypeError,
            "weight must be a floating-point tensor, got torch.int64",
        ),
        (dict(weight=torch.ones(12, device="meta")), ValueError, "but weight is on meta"),
        (dict(weight=torch.ones(12, requires_grad=True)), NotImplementedError, "class weights is not implemented"),
        (dict(weight=[1.0] * 12), TypeError, "weight must be a tensor"),
        (dict(softcap=0.0), ValueError, "softcap must be None or a finite number > 0, got 0.0"),
        (dict(softcap=-1.0), ValueError, "got -1.0"),
        (dict(softcap=math.nan), ValueError, "got nan"),
        (dict(softcap=math.inf), ValueError, "got inf"),
        (dict(softcap=True), TypeError, "softcap must be None or a float, got bool"),
        (dict(softcap="30"), TypeError, "got str"),
        (dict(z_loss=-1e-4), ValueError, "z_loss must be a finite number >= 0, got -0.0001"),
        (dict(z_loss=math.nan), ValueError, "got nan"),
        (dict(z_loss=math.inf), ValueError, "got inf"),
        (dict(z_loss=True), TypeError, "z_loss must be a float, got bool"),
        (dict(return_lse=1), TypeError, "return_lse must be a bool, got int"),
        (dict(return_lse="yes"), TypeError, "return_lse must be a bool, got str"),
    ]


@pytest.mark.parametrize("index", range(18))
def test_bad_options_raise_clear_errors(index):
    logits = make_logits((3, 12), torch.float32).requires_grad_(True)
    target = make_target((3,), 12)
    options, error, message = _bad(logits, target)[index]
    with pytest.raises(error, match=message):
        smoothce.cross_entropy(logits, target, **options)
    if "return_lse" not in options:
        weight = options.pop("weight", None)
        with pytest.raises(error, match=message):
            smoothce.CrossEntropyLoss(weight, **options)(logits, target)
        schema_takes = not isinstance(weight, list) and not any(isinstance(v, (bool, str)) for v in options.values())
        if schema_takes:  # the raw op, whose schema converts first
            with pytest.raises(error, match=message):
                torch.ops.smoothce.cross_entropy(logits, target, weight, **options)
    assert logits.grad is None


class _TorchOnly(Backend):
    """A third party's backend with ``forward`` alone: the options come from ``Backend``'s defaults."""

    name, device_type = "torch-only", "cpu"

    def forward(self, *args):
        raise AssertionError("the recipe path must not call the plain forward")


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_default_forward_recipe_in_torch_ops(dtype, options, monkeypatch):
    # torch_defaults.forward_recipe, what every backend without its own gets, through Backend's
    # loss_and_grad ("mean", the weighted count as normalizer, as the op passes it) and in blocks of
    # a few rows; then written over its own logits, as the fused linear loss asks.
    monkeypatch.setitem(torch_defaults.SHARD_BLOCK_ELEMENTS, "cpu", 3 * 40)
    logits = make_logits((7, 40), dtype)
    target = make_target((7,), 40)
    target[2] = 5
    logits[2, 5] += 14.0  # a confident row
    options = resolve(options, 40)
    weight = options.get("weight")
    recipe = Recipe(
        None if weight is None else weight.to(torch.float64 if dtype == torch.float64 else torch.float32),
        options.get("z_loss", 0.0),
        options.get("softcap"),
    )
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lse = torch.empty(7, dtype=acc)
    normalizer = None if weight is None else smoothce.numerics.weighted_count(recipe.weight, target, -100)
    loss, grad, factor = _TorchOnly().loss_and_grad(logits, target, 0.1, -100, "mean", True, normalizer, recipe, lse)
    exact = cross_entropy_reference(
        logits,
        target,
        weight,
        label_smoothing=0.1,
        z_loss=options.get("z_loss", 0.0),
        softcap=options.get("softcap"),
        return_lse=True,
    )
    grad = (grad.to(acc) * factor).to(dtype)
    assert_as_accurate_as_pytorch(
        logits, target, loss, grad, lse, label_smoothing=0.1, **{k: v for k, v in options.items() if k != "return_lse"}
    )
    torch.testing.assert_close(lse.double(), exact[2], rtol=1e-6, atol=1e-6)
    one = torch.tensor(1.0, dtype=acc)
    separate = torch.empty_like(logits)
    rows = torch_defaults.forward_recipe(logits, target, 0.1, -100, separate, one, recipe)
    over = logits.clone()  # the gradient written over its own logits
    torch.testing.assert_close(torch_defaults.forward_recipe(over, target, 0.1, -100, over, one, recipe), rows)
    assert torch.equal(over, separate)


def test_opcheck_with_options():
    logits = make_logits((6, 11), torch.float32).requires_grad_(True)
    target = make_target((6,), 11)
    weight = class_weights(11)
    options = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0}
    torch.library.opcheck(torch.ops.smoothce.cross_entropy.default, (logits, target, weight), options)
    torch.library.opcheck(torch.ops.smoothce.cross_entropy_lse.default, (logits, target, weight), options)
    torch.library.opcheck(
        torch.ops.smoothce.cross_entropy_recipe_fwd.default,
        (logits, target, 0.1, -100, "mean", True, None, weight, 1e-3, 3.0, True),
    )


@pytest.mark.compile
def test_compile_with_options_no_graph_break_no_recompile():
    counter = CompileCounterWithBackend("aot_eager")
    weight = class_weights(37)

    @torch.compile(backend=counter, fullgraph=True, dynamic=True)
    def step(logits, target):
        loss, lse = smoothce.cross_entropy(
            logits, target, weight, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, return_lse=True
        )
        return loss * 2.0, lse

    for rows in (5, 8, 13):  # the batch size changes; nothing may recompile
        logits = make_logits((rows, 37), torch.float32, seed=rows)
        target = make_target((rows,), 37, seed=rows)
        leaf = logits.clone().requires_grad_(True)
        loss, lse = step(leaf, target)
        loss.backward()
        exact = cross_entropy_reference(
            logits, target, weight, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, return_lse=True
        )
        torch.testing.assert_close(loss.double(), 2.0 * exact[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(leaf.grad.double(), 2.0 * exact[1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(lse.double(), exact[2], rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times, expected once"


def test_torch_func_grad_and_vmap_with_options():
    weight = class_weights(23)
    options = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    logits = make_logits((3, 5, 23), torch.float32)
    target = make_target((3, 5), 23)
    target[1] = -100  # one sample with no counted row: its weighted mean is 0

    def loss_of(z, t):
        return smoothce.cross_entropy(z, t, weight, **options)

    grads = torch.func.vmap(torch.func.grad(loss_of))(logits, target)
    values = torch.func.vmap(loss_of)(logits, target)
    for i in range(3):
        exact = cross_entropy_reference(logits[i], target[i], weight, **options)
        torch.testing.assert_close(values[i].double(), exact[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[i].double(), exact[1], rtol=1e-5, atol=1e-7)
