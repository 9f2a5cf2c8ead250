"""Bad input: a clear error naming the problem, raised before any work is done."""

from __future__ import annotations

import re

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
