"""The cross-entropy implementations the benchmark compares (the same mean loss of logits (N, V), with the case's
options), and ``Step``: one run of one of them. liger, flash-attn and quack are imported only where installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import smoothce

FWD, FWD_BWD = "fwd", "fwd+bwd"
MODES = (FWD_BWD, FWD)
# The loss options a case may turn on (``cases.Case.option_names``); "weighted z_loss": both weight and z_loss.
OPTIONS = frozenset({"label_smoothing", "softcap", "z_loss", "weight", "weighted z_loss"})
BASELINE_FOR_RATIOS = "smoothce"  # every other implementation is a baseline it is compared with
# torch.compile's backend for the torch-compile baseline; tests of the sweep's logic set "aot_eager".
COMPILE_BACKEND = "inductor"


def composed_loss(z, t, weight=None, *, ignore_index=-100, softcap=None, z_loss=0.0, sum_=False, **label_smoothing):
    """PyTorch composing the loss: ``F.cross_entropy`` of z' = c·tanh(z / c) with ``weight``, plus the z-loss
    s·w_k·logsumexp(z')² of each counted row; the mean divides both by Σ w_k over the counted rows (PyTorch's
    weighted mean). ``sum_``: the sums instead, (loss sum, Σ w_k). Options left at their defaults add nothing."""
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(
        z, t, weight, ignore_index=ignore_index, reduction="sum" if sum_ else "mean", **label_smoothing
    )
    if not (z_loss or sum_):
        return loss
    counted = t != ignore_index
    w_k = counted.to(z.dtype) if weight is None else torch.where(counted, weight[t.clamp_min(0)], 0)
    z_sum = z_loss * (w_k * torch.logsumexp(z, -1).square()).sum() if z_loss else 0.0
    return (loss + z_sum, w_k.sum()) if sum_ else loss + z_sum / w_k.sum()


def unavailable(module: str | None = None, device_type: str = "", device_types: Iterable[str] | None = None):
    """None when ``module`` imports and ``device_type`` is one of ``device_types`` (None: any), else why not."""
    if device_types is not None and device_type not in device_types:
        return f"runs only on {', '.join(device_types)} devices"
    if module is not None:
        if importlib.util.find_spec(package := module.split(".")[0]) is None:
            return f"not installed (no module {package!r})"
        try:
            importlib.import_module(module)
        except Exception as error:  # a broken optional install (say a Triton/torch mismatch) must not stop the run
            return f"import of {module} failed: {type(error).__name__}: {error}"[:300]
    return None


@dataclass(frozen=True)
class Implementation:
    """A named way to compute the loss: ``build(label_smoothing, ignore_index, **options)``, ``options`` the case's
    softcap, z_loss and weight that are on, returns a fresh loss function (logits, target) -> scalar."""

    name: str
    description: str
    build: Callable[..., Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    device_types: tuple[str, ...] | None = None  # None: any device
    module: str | None = None  # the module that must be importable, for optional libraries
    supports: frozenset[str] = frozenset({"label_smoothing"})  # the options of OPTIONS it has
    mutates_input: bool = False  # writes into the logits (restored before every run)
    dynamic_rows: bool = False  # mark dim 0 of the inputs dynamic for torch.compile

    def unavailable_reason(self, device_type: str, options: Iterable[str] = ()) -> str | None:
        """None when this implementation can run here with ``options`` (names of OPTIONS); otherwise a short reason."""
        if why := unavailable(self.module, device_type, self.device_types):
            return why
        missing = [name for name in options if name not in self.supports]
        return f"not supported: {', '.join(missing)} (it runs only without)" if missing else None


def _calling(function, z_loss: str = "z_loss", **fixed):
    """The builder of a loss that calls ``function`` (or the "module:name" it names, imported when built) as
    function(logits, target, label_smoothing=λ, ignore_index=i, **options, **fixed), z_loss under its own name."""

    def build(label_smoothing, ignore_index, **options):
        module, _, name = function.partition(":") if isinstance(function, str) else ("", "", "")
        fn = getattr(importlib.import_module(module), name) if name else function
        kw = {z_loss if key == "z_loss" else key: value for key, value in options.items()} | fixed
        return lambda z, t: fn(z, t, label_smoothing=label_smoothing, ignore_index=ignore_index, **kw)

    return build


def _build_compile(label_smoothing: float, ignore_index: int, **options):
    # dynamic=False keeps V static (Step marks the rows dynamic); the runner resets Dynamo when V changes.
    eager = _calling(composed_loss)(label_smoothing, ignore_index, **options)
    return torch.compile(eager, backend=COMPILE_BACKEND, dynamic=False)


def _flash_attn(z, t, ignore_index, **kw):
    """flash-attn's per-row losses (its z-loss in them, 0 on ignored rows), meaned over the counted rows."""
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    return cross_entropy_loss(z, t, ignore_index=ignore_index, **kw)[0].sum() / (t != ignore_index).sum().clamp_min(1)


def _build_quack(label_smoothing, ignore_index):
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
        Implementation("smoothce", "smoothce.cross_entropy", _calling(smoothce.cross_entropy), supports=OPTIONS),
        Implementation(
            "torch-eager",
            "torch.nn.functional.cross_entropy (with the options: of c·tanh(z / c), plus the z-loss; composed_loss)",
            _calling(composed_loss),
            supports=OPTIONS,
        ),
        Implementation(
            "torch-compile",
            "torch.compile of the same, dynamic=False, rows marked dynamic: compiled per V, dtype and mode, "
            "compilation not timed",
            _build_compile,
            supports=OPTIONS,
            dynamic_rows=True,
        ),
        # Liger divides its z-loss by the count of rows, not by Σ w_k: with class weights, not this loss.
        Implementation(
            "liger",
            "liger_kernel.transformers.functional.liger_cross_entropy (Triton)",
            _calling("liger_kernel.transformers.functional:liger_cross_entropy", "lse_square_scale", reduction="mean"),
            ("cuda", "xpu"),
            "liger_kernel.transformers.functional",
            OPTIONS - {"weighted z_loss"},
            mutates_input=True,
        ),
        Implementation(
            "flash-attn",
            "flash_attn.ops.triton.cross_entropy.cross_entropy_loss (Triton)",
            _calling(_flash_attn, "lse_square_scale"),
            ("cuda",),
            "flash_attn.ops.triton.cross_entropy",
            frozenset({"label_smoothing", "z_loss"}),
        ),
        Implementation(
            "quack",
            "quack.cross_entropy.cross_entropy (CuTe DSL)",
            _build_quack,
            ("cuda",),
            "quack.cross_entropy",
            frozenset(),
        ),
    )
}


class Step:
    """One run of one implementation on one case: ``prepare()`` untimed, then ``run()`` timed: the forward under
    ``torch.no_grad()`` ("fwd"), or the previous gradient dropped (as a training step's ``zero_grad``), the forward
    and ``loss.backward()`` ("fwd+bwd"). An implementation that writes into the logits (Liger) gets its own copy."""

    def __init__(self, impl: Implementation, logits, target, mode: str, label_smoothing, ignore_index=-100, **options):
        self.mode, self.target = mode, target
        self.loss_fn = impl.build(label_smoothing, ignore_index, **options)
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
