"""The interface every smoothce backend implements.

A backend computes, for a block of rows of logits z (N, V) and targets k (N,),
the per-row loss and (optionally) the gradient, both from the spec:

    r = logsumexp(z),  s = sum_j z_j,
    loss = r - (1 - lam) * z_k - (lam / V) * s
    grad = grad_scale * (softmax(z) - lam / V - (1 - lam) * onehot(k))

Rows whose target equals ``ignore_index`` get loss 0 and a zero gradient.
Everything else (argument checks, reshaping, reduction, autograd) lives in
``smoothce._ops``; a backend sees only 2-D logits and 1-D targets.
"""

from __future__ import annotations

import torch


class Backend:
    """Base class: subclass it, set ``name`` and ``device_type``, implement ``forward``.

    ``name`` is what ``SMOOTHCE_BACKEND`` and ``smoothce.registry.select(...).name``
    use; ``device_type`` is the torch device type whose tensors it serves
    ("cpu", "cuda", "xpu", or a third party's).
    """

    name: str = ""
    device_type: str = ""

    def unavailable_reason(self, device_type: str) -> str | None:
        """None when this backend can compute on tensors of ``device_type`` here.

        Otherwise a sentence saying what is missing and what to install or set,
        for example Triton, a GPU, or ``TRITON_INTERPRET=1`` for CPU tensors.
        """
        return None

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        label_smoothing: float,
        ignore_index: int,
        grad: torch.Tensor | None,
        grad_scale: torch.Tensor,
    ) -> torch.Tensor:
        """Compute per-row losses and, when ``grad`` is given, write the gradient into it.

        Args:
            logits: (N, V), float16/bfloat16/float32/float64, any strides, N >= 1, V >= 1.
            target: (N,), int32 or int64, contiguous.
            label_smoothing: lam in [0, 1].
            ignore_index: target value of rows that contribute nothing.
            grad: (N, V) output buffer of ``logits.dtype`` (any strides), or None
                when no gradient is needed: then no gradient work is done at all.
            grad_scale: 0-d tensor on the logits' device, float32 (float64 for float64
                logits); the gradient is multiplied by it (1/count for "mean", 1 otherwise).

        Returns:
            (N,) per-row loss, float32 (float64 for float64 logits), 0 on ignored rows.

        A target outside [0, V) that is not ``ignore_index`` must be an error before
        anything is written: ``ValueError`` naming the value where the check is
        free (CPU tensors), a device-side assert elsewhere. It must never cause an
        out-of-bounds access.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<smoothce backend {self.name!r} for {self.device_type!r} tensors>"


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The loss dtype for logits of ``dtype``: float64 stays float64, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
