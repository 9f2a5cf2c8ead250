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

from smoothce.numerics import kept_factors, loss_dtype


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

    def loss_and_grad(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        label_smoothing: float,
        ignore_index: int,
        reduction: str,
        compute_grad: bool,
        normalizer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The op's forward: (loss, kept gradient, backward factor) for 2-D ``logits`` (N >= 1, V).

        loss: (N,) for "none", 0-d for "sum"/"mean", in ``loss_dtype``. "mean" divides the sum of
        the rows by ``normalizer`` where one is given (a 0-d tensor of ``loss_dtype`` on the
        logits' device, read on the device: <= 0 gives loss 0 and a zero gradient), else by the
        count of non-ignored targets (none counted: loss 0, not NaN). The kept gradient (or None
        without ``compute_grad``) has the logits' dtype and holds grad_scale x d loss / d logits
        (``smoothce.numerics.kept_factors``); backward multiplies it by dO x ``factor`` (0-d, on
        the device). This default runs ``forward`` and reduces with torch; a backend may fuse the
        count and the reduction into its kernels.
        """
        acc = loss_dtype(logits.dtype)
        if reduction != "mean":
            denominator = torch.ones((), dtype=acc, device=logits.device)
        elif normalizer is not None:
            denominator = normalizer
        else:
            denominator = (target != ignore_index).sum().clamp_min(1).to(acc)
        grad_scale, factor = kept_factors(denominator, logits.dtype)
        grad = torch.empty_like(logits) if compute_grad else None
        rows = self.forward(logits, target, label_smoothing, ignore_index, grad, grad_scale)
        if reduction == "none":
            return rows, grad, factor
        total = rows.sum()
        if reduction == "sum":
            return total, grad, factor
        return torch.where(denominator > 0, total / torch.where(denominator > 0, denominator, 1.0), 0.0), grad, factor

    def scale_grad(
        self, grad: torch.Tensor, grad_out: torch.Tensor, factor: torch.Tensor, per_row: bool, inplace: bool
    ) -> torch.Tensor:
        """Backward: dO x ``factor`` x the kept ``grad``, computed in float32 (float64) and rounded once.

        ``grad_out`` is 0-d, or (N,) for a "none" loss (``per_row``). In place, the result is
        ``grad`` itself; otherwise a new tensor. On CPU a product of exactly 1 in place is seen
        for free and skips the pass (``loss.backward()`` of a "mean" or "sum" loss).
        """
        if not per_row and inplace and grad.device.type == "cpu" and grad_out.item() * factor.item() == 1.0:
            return grad  # (exactly 1 in float64 is exactly 1 in float32)
        # Per row (N, 1); else shape (1,), not 0-d: a 0-d multiplier would be rounded to the
        # gradient's (half) dtype first, and 2**-15 / count can underflow float16; this way the
        # product is taken in float32 and rounded once into the result.
        scale = grad_out * factor
        scale = scale.unsqueeze(-1) if per_row else scale.reshape(1)
        if inplace:
            return grad.mul_(scale)
        return torch.mul(grad, scale, out=torch.empty_like(grad))

    def __repr__(self) -> str:
        return f"<smoothce backend {self.name!r} for {self.device_type!r} tensors>"

    # -----------------------------------------------------------------------------------------
    # The two halves of the vocabulary-parallel loss (smoothce.distributed). A rank holds the
    # columns [start, start + V_i) of the logits, V = sum of the V_i is the global vocabulary;
    # the defaults below are plain vectorised torch on blocks of rows, for every device.

    def shard_stats(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        start: int | torch.Tensor,
        label_smoothing: float,
        ignore_index: int,
    ) -> torch.Tensor:
        """Per-row statistics of one slice of the classes, each relative to the slice's own max.

        With z the slice's row (columns j = 0 .. V_i - 1 are the global classes start + j),
        k the global target and lam the smoothing:

            m = max_j z_j                                   (-inf for an all -inf row)
            R = sum_{j != a} exp(z_j - m),  a one column holding m   (S_i = 1 + R; the
                max's exact 1 is left out so that rows where it dominates keep R's digits)
            t = sum_j (z_j - m~),  m~ = m where finite, else 0    (only when lam > 0, else 0)
            z_k = z_{k - start} when start <= k < start + V_i and k != ignore_index, else 0

        Nothing here is summed over raw logits, so logits sharing a large offset lose no digits.

        Args:
            logits: (N, V_i) float16/bfloat16/float32/float64, any strides, V_i >= 1.
            target: (N,) int32/int64 global class ids, contiguous; already checked to lie in
                [0, V) or be ``ignore_index``.
            start: global class of column 0: a Python int, or a 0-d int64 tensor on the logits'
                device (accelerators: no host sync).
            label_smoothing: lam in [0, 1]. ignore_index: as in ``forward``.

        Returns:
            (4, N) float32 (float64 for float64 logits): the rows m, R, t, z_k.
        """
        n_rows, local_classes = logits.shape
        acc = loss_dtype(logits.dtype)
        stats = torch.zeros(4, n_rows, dtype=acc, device=logits.device)
        if n_rows == 0:
            return stats
        logits = logits.detach()
        k, owned = _local_target(target, start, local_classes, ignore_index)
        z_k = logits.gather(1, k.unsqueeze(1)).squeeze(1).to(acc)
        stats[3] = torch.where(owned, z_k, 0.0)
        for lo, hi in _row_blocks(n_rows, local_classes, logits.device):
            x = logits[lo:hi].to(acc)
            m, first = x.max(dim=1, keepdim=True)  # a (the first) column holding the max
            shift = torch.where(torch.isfinite(m), m, 0.0)
            x = x - shift
            if label_smoothing > 0.0:
                stats[2, lo:hi] = x.sum(dim=1)
            e = x.exp_()
            e.scatter_(1, first, 0.0)
            stats[0, lo:hi] = m.squeeze(1)
            stats[1, lo:hi] = e.sum(dim=1)
        return stats

    def shard_grad(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        start: int | torch.Tensor,
        num_classes: int | torch.Tensor,
        row_max: torch.Tensor,
        excess: torch.Tensor,
        label_smoothing: float,
        ignore_index: int,
        grad_scale: torch.Tensor,
        grad: torch.Tensor,
    ) -> None:
        """Write the slice's gradient into ``grad`` from the all-reduced statistics of the whole row.

        With M the global row max (M~ = M where finite, else 0), S = sum_j exp(z_j - M~) over
        all V classes given as its excess e = S - 1 (summed apart from one max's exact 1),
        p_j = exp(z_j - M~) / S and c = ``grad_scale``:

            grad_j = c (p_j - lam / V)                                     j != k - start
            grad_k = c ((p_k - lam / V) - (1 - lam))                       the target column
                   = c ((lam - lam / V) - e / S)          when z_k = M and e < 1 (p_k > 1/2)

        The first target form cancels exactly at lam = 1 (and for p_k >= 1/2 at lam = 0, by
        Sterbenz); the second, p_k - 1 = -e / S, keeps the digits of a confident row, where
        p_k - 1 in float32 would keep none. Every element is rounded to ``grad``'s dtype once;
        rows whose target is ``ignore_index`` get zeros.

        Args:
            logits, target, start, label_smoothing, ignore_index: as in ``shard_stats``.
            num_classes: V, the GLOBAL vocabulary size (Python int or 0-d int64 tensor).
            row_max, excess: (N,) M and e, float32 (float64 for float64 logits).
            grad_scale: 0-d tensor on the logits' device, the factor c.
            grad: (N, V_i) output in the logits' dtype, any strides.
        """
        n_rows, local_classes = logits.shape
        if n_rows == 0:
            return
        acc = loss_dtype(logits.dtype)
        logits = logits.detach()
        lam = float(label_smoothing)
        smooth = lam / (num_classes.to(acc) if isinstance(num_classes, torch.Tensor) else num_classes)
        k, owned = _local_target(target, start, local_classes, ignore_index)
        valid = target != ignore_index
        shift = torch.where(torch.isfinite(row_max), row_max, 0.0)
        inv_sum = torch.where(valid, 1.0 / (1.0 + excess), 0.0)  # ignored rows: 0 even where S = 0
        row_scale = torch.where(valid, grad_scale.to(acc), 0.0)
        # The target column per row: one value each, outside the block loop.
        z_k = logits.gather(1, k.unsqueeze(1)).squeeze(1).to(acc)
        p_k = torch.exp(z_k - shift) * inv_sum
        confident = (z_k == row_max) & (excess < 1.0)
        g_k = torch.where(confident, (lam - smooth) - excess * inv_sum, (p_k - smooth) - (1.0 - lam))
        g_k = (g_k * row_scale).unsqueeze(1)
        for lo, hi in _row_blocks(n_rows, local_classes, logits.device):
            p = torch.exp(logits[lo:hi].to(acc) - shift[lo:hi].unsqueeze(1)).mul_(inv_sum[lo:hi].unsqueeze(1))
            if lam != 0.0:
                p.sub_(smooth)
            p.mul_(row_scale[lo:hi].unsqueeze(1))
            rows_k = k[lo:hi].unsqueeze(1)
            p.scatter_(1, rows_k, torch.where(owned[lo:hi].unsqueeze(1), g_k[lo:hi], p.gather(1, rows_k)))
            grad[lo:hi] = torch.where(valid[lo:hi].unsqueeze(1), p, 0.0)


# Elements of one block of rows in the default shard methods: 1M on CPU (4 MiB of fp32
# scratch, which stays in cache), 16M elsewhere (64 MiB).
_SHARD_BLOCK_ELEMENTS = {"cpu": 1 << 20}
_SHARD_BLOCK_ELEMENTS_DEFAULT = 1 << 24


def _row_blocks(n_rows: int, num_classes: int, device: torch.device):
    """(lo, hi) ranges of rows whose (rows, num_classes) block fits the device's budget."""
    budget = _SHARD_BLOCK_ELEMENTS.get(device.type, _SHARD_BLOCK_ELEMENTS_DEFAULT)
    rows = max(1, budget // max(num_classes, 1))
    for lo in range(0, n_rows, rows):
        yield lo, min(lo + rows, n_rows)


def _local_target(target: torch.Tensor, start, local_classes: int, ignore_index: int):
    """(k, owned): the target's column in a slice starting at ``start`` (0 where not owned), and
    whether this slice holds it (in range and not ``ignore_index``)."""
    k = target.to(torch.int64) - start
    owned = (target != ignore_index) & (k >= 0) & (k < local_classes)
    return torch.where(owned, k, 0), owned
