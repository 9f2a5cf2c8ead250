"""The argument rules of smoothce's cross-entropy: one set for every entry point, PyTorch's.

Each rule is checked once per call, where it can be seen:

* ``option_values`` holds what the op's schema cannot see, because it coerces first: a bool
  (``True`` would become 1.0 or 1), numpy scalars and 0-d tensors (converted, as
  ``F.cross_entropy`` converts them), and the int64 range of ``ignore_index`` (the schema's
  own message for 2**63 names no range). ``smoothce.cross_entropy`` and
  ``smoothce.CrossEntropyLoss`` apply it before calling the op, and ``check_tensors_given``
  (PyTorch's TypeError for a non-tensor, where the schema raises a RuntimeError).
* ``check_arguments`` holds the rest: tensors, dtypes, shapes, devices, the range of
  ``label_smoothing`` and the name of ``reduction``. The public op's composite implementation
  runs it, so ``torch.ops.smoothce.cross_entropy`` and everything above it pass here once.

Only metadata is read, so the checks work on fake and meta tensors (torch.compile).
"""

from __future__ import annotations

import contextlib
import numbers
import threading

import torch

REDUCTIONS = ("none", "mean", "sum")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _is_bool(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    return isinstance(value, bool) or type(value).__name__ in ("bool", "bool_")  # numpy's bool is no subclass


def _is_real(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_complex()
    return isinstance(value, numbers.Real)


def _is_integer(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not (value.is_floating_point() or value.is_complex())
    return isinstance(value, numbers.Integral)  # numpy integers are registered as Integral


def option_values(label_smoothing, ignore_index) -> tuple[float, int]:
    """``(float(label_smoothing), int(ignore_index))``, or TypeError/ValueError naming the value.

    label_smoothing: a real number (float, int, numpy scalar, 0-d floating or integer tensor).
    ignore_index: an integer (int, numpy integer, 0-d integer tensor) in the int64 range.
    A bool is neither: ``label_smoothing=True`` or ``ignore_index=False`` is a mistake, not 1 or 0.
    """
    if type(label_smoothing) is not float:
        if _is_bool(label_smoothing) or not _is_real(label_smoothing):
            raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
        label_smoothing = float(label_smoothing)
    if type(ignore_index) is not int:
        if _is_bool(ignore_index) or not _is_integer(ignore_index):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        ignore_index = int(ignore_index)
    if not INT64_MIN <= ignore_index <= INT64_MAX:
        raise ValueError(f"ignore_index must be in the int64 range [-2**63, 2**63 - 1], got {ignore_index}")
    return label_smoothing, ignore_index


def check_tensors_given(logits, target) -> None:
    """TypeError unless both are tensors (the schema would say so with a RuntimeError instead)."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"logits and target must be tensors, got {type(logits).__name__} and {type(target).__name__}")


def check_weight_given(weight, name: str = "weight") -> None:
    """TypeError unless the class weights ``weight`` (called ``name``) are a tensor or None (the schema
    would say so with a RuntimeError)."""
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of class weights or None, got {type(weight).__name__}")


def check_option_values(label_smoothing: float, reduction) -> None:
    """The value rules of the options: label_smoothing in [0, 1], a known reduction."""
    if not 0.0 <= label_smoothing <= 1.0:  # False for NaN too
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")


def check_arguments(logits, target, label_smoothing, ignore_index, reduction) -> torch.Tensor:
    """Raise TypeError/ValueError naming the bad argument; return ``target`` ready to compare.

    The returned target is ``target`` itself, or an int64 copy where an int32 target meets an
    ``ignore_index`` outside the int32 range (which no int32 target equals, and which an int32
    comparison would wrap onto a real class: 2**32 + 1 onto 1). Options that are not yet a
    plain float and int (a direct Python caller) go through ``option_values`` first.
    """
    check_tensors_given(logits, target)  # always true behind the schema; direct Python callers
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(f"target must be int64 or int32 class indices, got {target.dtype}")
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension (..., V), got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have at least one class (V >= 1), got shape {tuple(logits.shape)}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}: "
            f"expected target of shape {tuple(logits.shape[:-1])} (logits without the class dimension, "
            "which is last)"
        )
    if logits.device != target.device:
        raise ValueError(f"logits are on {logits.device} but target is on {target.device}")
    if type(label_smoothing) is not float or type(ignore_index) is not int:
        label_smoothing, ignore_index = option_values(label_smoothing, ignore_index)
    check_option_values(label_smoothing, reduction)
    if target.dtype == torch.int32 and not INT32_MIN <= ignore_index <= INT32_MAX:
        return target.long()
    return target


def recipe_values(z_loss, softcap, return_lse=False) -> tuple[float, float | None]:
    """``(float(z_loss), float(softcap) or None)``, or TypeError/ValueError naming the bad value.

    z_loss: a finite real >= 0. softcap: None or a finite real > 0. return_lse: a bool. (A bool is
    no number here either: ``z_loss=True`` is a mistake.)
    """
    if _is_bool(z_loss) or not _is_real(z_loss):
        raise TypeError(f"z_loss must be a float, got {type(z_loss).__name__}")
    z_loss = float(z_loss)
    if not 0.0 <= z_loss < float("inf"):  # False for NaN too
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None:
        if _is_bool(softcap) or not _is_real(softcap):
            raise TypeError(f"softcap must be None or a float, got {type(softcap).__name__}")
        softcap = float(softcap)
        if not 0.0 < softcap < float("inf"):
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    if not _is_bool(return_lse) or isinstance(return_lse, torch.Tensor):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    return z_loss, softcap


def check_weight(weight, logits) -> None:
    """TypeError/ValueError/NotImplementedError naming a class ``weight`` that is not None or a
    floating (V,) tensor on the logits' device that does not require grad (PyTorch has no gradient
    for it either). Metadata only."""
    check_weight_given(weight)  # (direct Python callers; the schema takes a tensor)
    if weight is None:
        return
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    num_classes = logits.shape[-1] if logits.dim() else 0
    if weight.dim() != 1 or weight.shape[0] != num_classes:
        raise ValueError(
            f"weight must have shape ({num_classes},), one weight per class of the logits' last "
            f"dimension, got shape {tuple(weight.shape)}"
        )
    if weight.device != logits.device:
        raise ValueError(f"logits are on {logits.device} but weight is on {weight.device}")
    if weight.requires_grad:
        raise NotImplementedError(
            "the gradient with respect to the class weights is not implemented (nor is it in PyTorch's "
            "cross_entropy): pass weight.detach(), or a weight that does not require grad"
        )


def bad_target_message(value: int, num_classes: int, ignore_index: int) -> str:
    """The error text for a target outside [0, V) that is not ``ignore_index``."""
    return (
        f"target value {value} is out of range: expected a class index in "
        f"[0, {num_classes}) or ignore_index={ignore_index}"
    )


def check_targets_on_host(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise ``ValueError`` naming the first bad target; for CPU tensors, where it costs no sync."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad.nonzero()[0, 0]])
        raise ValueError(bad_target_message(value, num_classes, ignore_index))


_checked = threading.local()


@contextlib.contextmanager
def targets_checked():
    """Inside the block ``check_targets`` returns at once: for a caller that checked a whole call's
    targets and hands a backend slices of them (the fused linear loss's chunks), one check a call."""
    previous = getattr(_checked, "on", False)
    _checked.on = True
    try:
        yield
    finally:
        _checked.on = previous


def check_targets(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Every target ignore_index or in [0, V): ``check_targets_on_host`` for CPU tensors, elsewhere a
    device-side assert queued without a host sync (what a backend does before it indexes with them).
    Nothing inside ``targets_checked``."""
    if getattr(_checked, "on", False):
        return
    if target.device.type == "cpu":
        check_targets_on_host(target, num_classes, ignore_index)
        return
    ok = ~((target != ignore_index) & ((target < 0) | (target >= num_classes))).any()
    message = (
        f"smoothce.cross_entropy: a target is out of range: expected class indices in "
        f"[0, {num_classes}) or ignore_index={ignore_index}"
    )
    try:
        torch._assert_async(ok, message)
    except NotImplementedError:  # a device whose torch lacks the form with a message
        torch._assert_async(ok)


def check_normalizer(normalizer, reduction) -> None:
    """TypeError/ValueError naming a ``normalizer`` that is not None, a finite number >= 0 or a
    one-element real tensor, or one given with another reduction than "mean"."""
    if normalizer is None:
        return
    if reduction != "mean":
        raise ValueError(f"normalizer is only used with reduction='mean', got reduction={reduction!r}")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(
                f"normalizer must be a number or a one-element tensor, got shape {tuple(normalizer.shape)}"
            )
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise TypeError(f"normalizer must be a real number, got a {normalizer.dtype} tensor")
        return
    if _is_bool(normalizer) or not isinstance(normalizer, numbers.Real):
        raise TypeError(f"normalizer must be a number or a one-element tensor, got {type(normalizer).__name__}")
    if not 0.0 <= float(normalizer) < float("inf"):  # False for NaN too
        raise ValueError(f"normalizer must be a finite number >= 0, got {normalizer}")


def normalizer_tensor(normalizer, like: torch.Tensor) -> torch.Tensor | None:
    """A checked ``normalizer`` (``check_normalizer``) as a 0-d tensor of the loss dtype on ``like``'s device.

    No host sync: a number is written by a fill, and a CPU tensor meeting another device is read
    as a scalar operand (its value is taken at call time, so under CUDA-graph capture pass a tensor
    on the device instead).
    """
    if normalizer is None:
        return None
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if not isinstance(normalizer, torch.Tensor):
        return torch.full((), float(normalizer), dtype=dtype, device=like.device)
    value = normalizer.detach().reshape(())
    if value.device != like.device and value.device.type == "cpu":
        return torch.zeros((), dtype=dtype, device=like.device).add_(value)
    return value.to(device=like.device, dtype=dtype)
