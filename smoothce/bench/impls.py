"""The losses the benchmark compares (liger, flash-attn, quack imported where installed) and ``Step``, one run."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import smoothce

FWD_BWD, FWD = MODES = ("fwd+bwd", "fwd")
# The loss options a case may turn on (``cases.Case.option_names``); "weighted z_loss": both weight and z_loss.
OPTIONS = frozenset({"label_smoothing", "softcap", "z_loss", "weight", "weighted z_loss"})
BASELINE_FOR_RATIOS = "smoothce"  # every other implementation is a baseline it is compared with
COMPILE_BACKEND = "inductor"  # torch-compile's backend; tests of the sweep's logic set "aot_eager"


def composed_loss(z, t, weight=None, *, ignore_index=-100, softcap=None, z_loss=0.0, sum_=False, **label_smoothing):
    """``F.cross_entropy`` of z' = c·tanh(z / c) with ``weight`` plus s·w_k·logsumexp(z')² per counted row, both over
    Σ w_k (PyTorch's weighted mean); ``sum_``: (the sum, Σ w_k). Options at their defaults add nothing."""
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    reduction = "sum" if sum_ else "mean"
    loss = F.cross_entropy(z, t, weight, ignore_index=ignore_index, reduction=reduction, **label_smoothing)
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
    """A named loss: ``build(label_smoothing, ignore_index, **options on)`` -> a fresh (logits, target) -> scalar."""

    name: str
    description: str
    build: Callable[..., Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    supports: frozenset[str] = frozenset({"label_smoothing"})  # the options of OPTIONS it has
    module: str | None = None  # the module that must be importable, for optional libraries
    device_types: tuple[str, ...] | None = None  # None: any device
    mutates_input: bool = False  # writes into the logits (restored before every run)
    dynamic_rows: bool = False  # mark dim 0 of the inputs dynamic for torch.compile

    def unavailable_reason(self, device_type: str, options: Iterable[str] = ()) -> str | None:
        """None when this implementation can run here with ``options`` (names of OPTIONS); otherwise a short reason."""
        missing = [name for name in options if name not in self.supports]
        why = f"not supported: {', '.join(missing)} (it runs only without)" if missing else None
        return unavailable(self.module, device_type, self.device_types) or why


def _calling(function, z_loss: str = "z_loss", **fixed):
    """A builder calling ``function`` ("module:name": imported when built), λ where > 0, z_loss named ``z_loss``."""

    def build(label_smoothing, ignore_index, **options):
        module, _, name = function.partition(":") if isinstance(function, str) else ("", "", "")
        fn = getattr(importlib.import_module(module), name) if name else function
        kw = {z_loss if key == "z_loss" else key: value for key, value in options.items()} | fixed
        kw |= {"label_smoothing": label_smoothing} if label_smoothing else {}
        return lambda z, t: fn(z, t, ignore_index=ignore_index, **kw)

    return build


def _flash_attn(z, t, ignore_index, **kw):
    """flash-attn's per-row losses (its z-loss in them, 0 on ignored rows), meaned over the counted rows."""
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    return cross_entropy_loss(z, t, ignore_index=ignore_index, **kw)[0].sum() / (t != ignore_index).sum().clamp_min(1)


IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation("smoothce", "smoothce.cross_entropy", _calling(smoothce.cross_entropy), OPTIONS),
        Implementation(
            "torch-eager", "F.cross_entropy (options: of c·tanh(z / c), + z-loss)", _calling(composed_loss), OPTIONS
        ),
        Implementation(
            "torch-compile",
            "torch.compile of the same, dynamic=False, rows marked dynamic: compiled per V, dtype and mode, "
            "compilation not timed",
            lambda *args, **options: torch.compile(
                _calling(composed_loss)(*args, **options), backend=COMPILE_BACKEND, dynamic=False
            ),
            OPTIONS,
            dynamic_rows=True,
        ),
        # Liger divides its z-loss by the count of rows, not by Σ w_k: with class weights, not this loss.
        Implementation(
            "liger",
            "liger_kernel.transformers.functional.liger_cross_entropy (Triton)",
            _calling("liger_kernel.transformers.functional:liger_cross_entropy", "lse_square_scale", reduction="mean"),
            OPTIONS - {"weighted z_loss"},
            "liger_kernel.transformers.functional",
            ("cuda", "xpu"),
            mutates_input=True,
        ),
        Implementation(
            "flash-attn",
            "flash_attn.ops.triton.cross_entropy.cross_entropy_loss (Triton)",
            _calling(_flash_attn, "lse_square_scale"),
            frozenset({"label_smoothing", "z_loss"}),
            "flash_attn.ops.triton.cross_entropy",
            ("cuda",),
        ),
        Implementation(  # no label smoothing: it runs at λ = 0 only
            "quack",
            "quack.cross_entropy.cross_entropy (CuTe DSL)",
            _calling("quack.cross_entropy:cross_entropy", reduction="mean"),
            frozenset(),
            "quack.cross_entropy",
            ("cuda",),
        ),
    )
}


class Step:
    """``prepare()`` untimed, then ``run()``: the forward under ``no_grad`` ("fwd"), or ``zero_grad``, forward and
    backward ("fwd+bwd"), of one implementation on one case. Liger writes into a copy of its own."""

    def __init__(self, impl: Implementation, logits, target, mode: str, label_smoothing, ignore_index=-100, **options):
        self.mode, self.target = mode, target
        self.loss_fn = impl.build(label_smoothing, ignore_index, **options)
        # A leaf of its own per step, sharing the logits' storage otherwise, so gradients never mix.
        self._pristine = logits.detach() if impl.mutates_input else None
        self.logits = logits.detach().clone() if impl.mutates_input else logits.detach()
        self.logits.requires_grad_(mode == FWD_BWD)
        if impl.dynamic_rows and logits.shape[0] > 1:  # size 1 is always specialised
            torch._dynamo.mark_dynamic(self.logits, 0)
            torch._dynamo.mark_dynamic(self.target, 0)

    def release(self) -> None:
        self.logits.grad = None

    def prepare(self) -> None:
        """Reset to the state before a run: no gradient held, logits as generated."""
        self.release()
        if self._pristine is not None:
            self.logits.detach().copy_(self._pristine)

    def run(self) -> torch.Tensor:
        if self.mode == FWD:
            with torch.no_grad():
                return self.loss_fn(self.logits, self.target)
        self.logits.grad = None
        (loss := self.loss_fn(self.logits, self.target)).backward()
        return loss.detach()
