"""torch.library checks (opcheck) and torch.compile: no graph break, no recompile, compiled backward."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_grad_close, make_logits, make_target
from torch._dynamo.testing import CompileCounterWithBackend

import smoothce
from smoothce.reference import cross_entropy_reference

REDUCTIONS = ["mean", "sum", "none"]


# opcheck's fake-tensor test itself reads .grad of non-leaf copies of the inputs.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(reduction, requires_grad):
    logits = make_logits((6, 11), torch.float32).requires_grad_(requires_grad)
    target = make_target((6,), 11)
    torch.library.opcheck(
        torch.ops.smoothce.cross_entropy.default,
        (logits, target),
        {"label_smoothing": 0.1, "reduction": reduction},
    )
    torch.library.opcheck(
        torch.ops.smoothce.cross_entropy_fwd.default,
        (logits, target, 0.1, -100, reduction, requires_grad),
    )


@pytest.mark.compile
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_dynamic_no_recompile(reduction):
    # Inductor once (it costs about a minute on a small CPU); aot_eager sees the same graph breaks.
    counter = CompileCounterWithBackend("inductor" if reduction == "mean" else "aot_eager")

    @torch.compile(backend=counter, fullgraph=True, dynamic=True)
    def step(logits, target):
        loss = smoothce.cross_entropy(logits, target, label_smoothing=0.1, reduction=reduction)
        return loss.sum() * 2.0

    for rows in (5, 8, 13):  # the batch size changes; nothing may recompile
        logits = make_logits((rows, 37), torch.float32, seed=rows)
        target = make_target((rows,), 37, seed=rows)
        leaf = logits.clone().requires_grad_(True)
        loss = step(leaf, target)
        loss.backward()
        ref_loss, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1, reduction=reduction)
        torch.testing.assert_close(loss.double(), 2.0 * ref_loss.sum(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(leaf.grad.double(), 2.0 * ref_grad, rtol=1e-5, atol=1e-7)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times, expected once"


@pytest.mark.compile
def test_compile_module_bf16_no_grad_and_backward():
    module = torch.compile(
        smoothce.CrossEntropyLoss(label_smoothing=0.1), fullgraph=True, dynamic=True, backend="aot_eager"
    )
    logits = make_logits((2, 9, 50), torch.bfloat16)
    target = make_target((2, 9), 50)
    with torch.no_grad():
        loss = module(logits, target)
    ref_loss, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=1e-5)
    leaf = logits.clone().requires_grad_(True)
    module(leaf, target).backward()  # the compiled backward keeps the gradient's dtype
    assert leaf.grad.dtype == torch.bfloat16
    assert_grad_close(leaf.grad, ref_grad, torch.bfloat16)
