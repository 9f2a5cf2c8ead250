"""Bad input: a clear error naming the problem, raised before any work is done."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import smoothce


def logits_and_target(rows=4, num_classes=10):
    logits = torch.randn(rows, num_classes, requires_grad=True)
    target = torch.randint(0, num_classes, (rows,))
    return logits, target


@pytest.mark.parametrize("bad", [10, 11, -1, -101, 2**40])
def test_target_out_of_range_names_value_and_range(bad):
    logits, target = logits_and_target()
    target[2] = bad
    with pytest.raises(ValueError, match=rf"target value {bad} is out of range.*\[0, 10\).*ignore_index=-100"):
        smoothce.cross_entropy(logits, target)
    assert logits.grad is None


def test_bad_target_leaves_nothing_half_done(monkeypatch):
    # The check runs before the backend computes anything.
    backend = smoothce.registry.select("cpu")
    import smoothce.backends.cpu as cpu

    calls = []
    original = cpu._softmax_
    monkeypatch.setattr(cpu, "_softmax_", lambda *a, **k: calls.append(1) or original(*a, **k))
    logits, target = logits_and_target(rows=300, num_classes=5000)
    target[-1] = 5000
    with pytest.raises(ValueError, match="5000"):
        backend.forward(logits.detach(), target, 0.0, -100, torch.empty_like(logits), torch.tensor(1.0))
    assert calls == []


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), float("inf")])
def test_label_smoothing_out_of_range(value):
    logits, target = logits_and_target()
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        smoothce.cross_entropy(logits, target, label_smoothing=value)
    with pytest.raises(ValueError, match="label_smoothing"):
        smoothce.CrossEntropyLoss(label_smoothing=value)


@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", "batchmean"])
def test_unknown_reduction(reduction):
    logits, target = logits_and_target()
    with pytest.raises(ValueError, match=rf"reduction must be one of 'none', 'mean', 'sum', got '{reduction}'"):
        smoothce.cross_entropy(logits, target, reduction=reduction)
    with pytest.raises(ValueError, match="reduction"):
        smoothce.CrossEntropyLoss(reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_logits(dtype):
    logits = torch.zeros(3, 4, dtype=dtype)
    with pytest.raises(TypeError, match=rf"logits must be float32, float16, bfloat16 or float64, got {dtype}"):
        smoothce.cross_entropy(logits, torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16, torch.uint8, torch.bool])
def test_non_integer_target(dtype):
    logits, _ = logits_and_target(3, 4)
    with pytest.raises(TypeError, match=rf"target must be int64 or int32 class indices, got {dtype}"):
        smoothce.cross_entropy(logits, torch.zeros(3, dtype=dtype))


@pytest.mark.parametrize(
    ("logits_shape", "target_shape"),
    [((4, 10), (5,)), ((4, 10), (4, 1)), ((2, 3, 10), (6,)), ((4, 10), ()), ((10,), (1,))],
)
def test_target_shape_mismatch(logits_shape, target_shape):
    logits = torch.randn(logits_shape)
    target = torch.zeros(target_shape, dtype=torch.int64)
    expected = re.escape(str(tuple(logits_shape[:-1])))
    with pytest.raises(ValueError, match=rf"target shape .* does not match .* expected target of shape {expected}"):
        smoothce.cross_entropy(logits, target)


def test_zero_dim_logits():
    with pytest.raises(ValueError, match="0-d"):
        smoothce.cross_entropy(torch.tensor(1.0), torch.tensor(0))


def test_no_classes():
    with pytest.raises(ValueError, match=r"at least one class \(V >= 1\), got shape \(4, 0\)"):
        smoothce.cross_entropy(torch.empty(4, 0), torch.full((4,), -100))


def test_one_dim_logits_is_a_single_row():
    # (V,) logits with a 0-d target: one row, like PyTorch's unbatched input.
    logits = torch.randn(10)
    loss = smoothce.cross_entropy(logits, torch.tensor(3))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, torch.tensor(3)))


def test_bad_option_types():
    logits, target = logits_and_target()
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        smoothce.cross_entropy(logits, target, ignore_index=1.5)
    with pytest.raises(TypeError, match="label_smoothing must be a float, got str"):
        smoothce.cross_entropy(logits, target, label_smoothing="0.1")
    with pytest.raises(TypeError, match="logits and target must be tensors"):
        smoothce.cross_entropy(logits, [1, 2, 3, 4])


def test_device_mismatch():
    logits = torch.randn(2, 3, device="meta")
    with pytest.raises(ValueError, match="logits are on meta but target is on cpu"):
        smoothce.cross_entropy(logits, torch.zeros(2, dtype=torch.int64))


# --- one set of option rules for every entry point -------------------------------------------

ENTRY_POINTS = {
    "function": lambda logits, target, **options: smoothce.cross_entropy(logits, target, **options),
    "module": lambda logits, target, **options: smoothce.CrossEntropyLoss(**options)(logits, target),
    "op": lambda logits, target, **options: torch.ops.smoothce.cross_entropy(logits, target, **options),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize(
    "options",
    [
        dict(label_smoothing=np.float32(0.25)),
        dict(label_smoothing=np.float64(0.25)),
        dict(label_smoothing=torch.tensor(0.25)),
        dict(ignore_index=np.int64(3)),
        dict(ignore_index=np.int32(3)),
        dict(ignore_index=torch.tensor(3)),
        dict(label_smoothing=np.float32(0.25), ignore_index=np.int64(3), reduction="sum"),
    ],
    ids=["np.float32", "np.float64", "0-d-float-tensor", "np.int64", "np.int32", "0-d-int-tensor", "all"],
)
def test_numpy_and_tensor_options_are_accepted_everywhere(entry, options):
    # As F.cross_entropy takes them: numpy scalars and 0-d tensors mean their value.
    logits, target = logits_and_target()
    target[0] = 3
    plain = {name: (float(value) if name == "label_smoothing" else value) for name, value in options.items()}
    if "ignore_index" in plain:
        plain["ignore_index"] = int(plain["ignore_index"])
    result = ENTRY_POINTS[entry](logits, target, **options)
    expected = smoothce.cross_entropy(logits, target, **plain)
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
    reference = torch.nn.functional.cross_entropy(logits, target, **options)
    torch.testing.assert_close(result, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("entry", ["function", "module"])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(label_smoothing=True), "label_smoothing must be a float, got bool"),
        (dict(label_smoothing=np.True_), "label_smoothing must be a float, got bool"),
        (dict(label_smoothing=torch.tensor(True)), "label_smoothing must be a float, got Tensor"),
        (dict(label_smoothing="0.1"), "label_smoothing must be a float, got str"),
        (dict(label_smoothing=None), "label_smoothing must be a float, got NoneType"),
        (dict(ignore_index=True), "ignore_index must be an int, got bool"),
        (dict(ignore_index=np.False_), "ignore_index must be an int, got bool"),
        (dict(ignore_index=1.0), "ignore_index must be an int, got float"),
        (dict(ignore_index=np.float64(1.0)), "ignore_index must be an int, got float64"),
        (dict(ignore_index=torch.tensor(1.0)), "ignore_index must be an int, got Tensor"),
    ],
)
def test_option_types_rejected(entry, options, message):
    # A bool is a mistake, not 1 or 0 (PyTorch rejects ignore_index=True as well).
    logits, target = logits_and_target()
    with pytest.raises(TypeError, match=re.escape(message)):
        ENTRY_POINTS[entry](logits, target, **options)


@pytest.mark.parametrize("entry", ["function", "module"])
@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1, 10**30])
def test_ignore_index_beyond_int64_names_the_range(entry, ignore_index):
    logits, target = logits_and_target()
    expected = rf"ignore_index must be in the int64 range \[-2\*\*63, 2\*\*63 - 1\], got {ignore_index}"
    with pytest.raises(ValueError, match=expected):
        ENTRY_POINTS[entry](logits, target, ignore_index=ignore_index)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_option_values_rejected_everywhere(entry):
    logits, target = logits_and_target()
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        ENTRY_POINTS[entry](logits, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'mean', 'sum', got 'avg'"):
        ENTRY_POINTS[entry](logits, target, reduction="avg")


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_arguments_checked_once_per_call(entry, monkeypatch):
    # Every entry point reaches the op's composite implementation, which checks once; the
    # function and the module only convert what the op's schema would coerce unseen.
    import smoothce._ops
    import smoothce.functional

    calls = []
    for module, name in ((smoothce._ops, "check_arguments"), (smoothce.functional, "option_values")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    logits, target = logits_and_target()
    loss_fn = ENTRY_POINTS[entry]
    if entry == "module":
        module = smoothce.CrossEntropyLoss(label_smoothing=0.1)
        loss_fn = lambda logits, target: module(logits, target)
    calls.clear()
    loss_fn(logits, target).backward()
    assert calls.count("check_arguments") == 1
    assert calls.count("option_values") == (0 if entry == "op" else 1)
