"""The cross-entropy implementations the benchmark compares (the same mean label-smoothed loss of logits (N, V)),
and ``Step``: one run of one of them. liger, flash-attn and quack are imported only where installed, on their GPUs.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import smoothce

FWD = "fwd"
FWD_BWD = "fwd+bwd"
MODES = (FWD_BWD, FWD)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Implementation:
    """A named way to compute the loss; ``build`` returns a fresh loss function for one case."""

    name: str
    description: str
    build: Callable[[float, int], LossFn]  # (label_smoothing, ignore_index) -> loss_fn
    device_types: tuple[str, ...] | None = None  # None: any device
    module: str | None = None  # the module that must be importable, for optional libraries
    supports_label_smoothing: bool = True
    mutates_input: bool = False  # writes into the logits (restored before every run)
    dynamic_rows: bool = False  # mark dim 0 of the inputs dynamic for torch.compile

    def unavailable_reason(self, device_type: str, label_smoothing: float) -> str | None:
        """None when this implementation can run here; otherwise a short reason."""
        if self.device_types is not None and device_type not in self.device_types:
            return f"runs only on {', '.join(self.device_types)} devices"
        if self.module is not None:
            package = self.module.split(".")[0]
            if importlib.util.find_spec(package) is None:
                return f"not installed (no module {package!r})"
            try:
                importlib.import_module(self.module)
            except Exception as error:  # a broken optional install must not stop the benchmark
                return f"import of {self.module} failed: {type(error).__name__}: {error}"
        if label_smoothing != 0.0 and not self.supports_label_smoothing:
            return "has no label smoothing (runs only with --label-smoothing 0)"
        return None


def _build_eager(label_smoothing: float, ignore_index: int, loss=F.cross_entropy) -> LossFn:
    return lambda z, t: loss(z, t, label_smoothing=label_smoothing, ignore_index=ignore_index)


# torch.compile's backend for the torch-compile baseline; tests of the sweep's logic set "aot_eager".
COMPILE_BACKEND = "inductor"


def _build_compile(label_smoothing: float, ignore_index: int) -> LossFn:
    # dynamic=False keeps V static (Step marks the rows dynamic); the runner resets Dynamo when V changes.
    return torch.compile(_build_eager(label_smoothing, ignore_index), backend=COMPILE_BACKEND, dynamic=False)


def _build_liger(label_smoothing: float, ignore_index: int) -> LossFn:
    from liger_kernel.transformers.functional import liger_cross_entropy

    return lambda z, t: liger_cross_entropy(
        z, t, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="mean"
    )


def _build_flash_attn(label_smoothing: float, ignore_index: int) -> LossFn:
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    def loss_fn(logits, target):
        # Returns per-row losses (0 on ignored rows) and z-losses; mean over counted rows.
        losses, _ = cross_entropy_loss(logits, target, label_smoothing=label_smoothing, ignore_index=ignore_index)
        return losses.sum() / (target != ignore_index).sum().clamp_min(1)

    return loss_fn


def _build_quack(label_smoothing: float, ignore_index: int) -> LossFn:
    from quack.cross_entropy import cross_entropy

    if "reduction" in inspect.signature(cross_entropy).parameters:
        return lambda logits, target: cross_entropy(logits, target, ignore_index=ignore_index, reduction="mean")

    def loss_fn(logits, target):  # older quack: per-row losses, no ignore_index
        counted = target != ignore_index
        return (cross_entropy(logits, target.clamp_min(0)) * counted).sum() / counted.sum().clamp_min(1)

    return loss_fn


IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation(
            "smoothce", "smoothce.cross_entropy", functools.partial(_build_eager, loss=smoothce.cross_entropy)
        ),
        Implementation("torch-eager", "torch.nn.functional.cross_entropy", _build_eager),
        Implementation(
            "torch-compile",
            "torch.compile(F.cross_entropy, dynamic=False), rows marked dynamic: compiled "
            "per V, dtype and mode, compilation not timed",
            _build_compile,
            dynamic_rows=True,
        ),
        Implementation(
            "liger",
            "liger_kernel.transformers.functional.liger_cross_entropy (Triton)",
            _build_liger,
            ("cuda", "xpu"),
            "liger_kernel.transformers.functional",
            mutates_input=True,
        ),
        Implementation(
            "flash-attn",
            "flash_attn.ops.triton.cross_entropy.cross_entropy_loss (Triton)",
            _build_flash_attn,
            ("cuda",),
            "flash_attn.ops.triton.cross_entropy",
        ),
        Implementation(
            "quack",
            "quack.cross_entropy.cross_entropy (CuTe DSL)",
            _build_quack,
            ("cuda",),
            "quack.cross_entropy",
            supports_label_smoothing=False,
        ),
    )
}
BASELINE_FOR_RATIOS = "smoothce"  # every other implementation is a baseline it is compared with


class Step:
    """One run of one implementation on one case: ``prepare()`` untimed, then ``run()`` timed: the forward under
    ``torch.no_grad()`` ("fwd"), or the previous gradient dropped (as a training step's ``zero_grad``), the forward
    and ``loss.backward()`` ("fwd+bwd"). An implementation that writes into the logits (Liger) gets its own copy."""

    def __init__(self, impl: Implementation, logits, target, mode: str, label_smoothing: float, ignore_index=-100):
        self.mode, self.target = mode, target
        self.loss_fn = impl.build(label_smoothing, ignore_index)
        # A leaf of its own per step, sharing the logits' storage otherwise, so gradients never mix.
        self._pristine = logits.detach() if impl.mutates_input else None
        source = logits.detach().clone() if impl.mutates_input else logits.detach()
        self.logits = source.requires_grad_(mode == FWD_BWD)
        if impl.dynamic_rows and logits.shape[0] > 1:  # size 1 is always specialised
            torch._dynamo.mark_dynamic(self.logits, 0)
            torch._dynamo.mark_dynamic(self.target, 0)

    def release(self) -> None:
        self.logits.grad = None

    def prepare(self) -> None:
        """Reset to the state before a run: no gradient held, logits as generated."""
        self.release()
        if self._pristine is not None:
            with torch.no_grad():
                self.logits.copy_(self._pristine)

    def run(self) -> torch.Tensor:
        if self.mode == FWD:
            with torch.no_grad():
                return self.loss_fn(self.logits, self.target)
        self.logits.grad = None
        (loss := self.loss_fn(self.logits, self.target)).backward()
        return loss.detach()
