"""The contract every smoothce backend implements: the ``Backend`` class.

A backend sees only 2-D logits and 1-D targets; argument checks, reshaping and autograd live in
``smoothce._ops``. The math each method must compute is in its docstring; the defaults, in plain
torch ops, are in ``torch_defaults``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from smoothce.backends import torch_defaults


class Recipe(NamedTuple):
    """The options beyond label smoothing, as backends receive them; all off is the plain loss.

    weight: (V,) class weights in the loss dtype (float32, float64 for float64 logits),
        contiguous, on the logits' device; None for all ones.
    z_loss: s >= 0, the weight of the z-loss s lse^2.
    softcap: c > 0, the cap of the soft-capped logits c tanh(z / c); None for none.
    """

    weight: torch.Tensor | None = None
    z_loss: float = 0.0
    softcap: float | None = None

    @property
    def plain(self) -> bool:
        """True when every option is off: the plain loss, which ``Backend.forward`` computes."""
        return self.weight is None and self.z_loss == 0.0 and self.softcap is None


def wants_recipe(recipe: Recipe | None, return_lse: bool) -> bool:
    """Whether a call takes ``forward_recipe``'s path: an option of ``recipe`` on, or the lse asked for."""
    return (recipe is not None and not recipe.plain) or return_lse


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

        For a row z of V logits with target k and smoothing lam (the README's math):

            loss = logsumexp(z) - (1 - lam) z_k - (lam / V) sum_j z_j
            grad = grad_scale (softmax(z) - lam / V - (1 - lam) onehot(k))

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

    def forward_recipe(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        label_smoothing: float,
        ignore_index: int,
        grad: torch.Tensor | None,
        grad_scale: torch.Tensor,
        recipe: Recipe,
        lse: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``forward`` with the ``recipe``'s options, and the row's log-sum-exp written into ``lse``.

        For a row z with target k, smoothing lam, class weights w (ones without ``recipe.weight``),
        W = sum_c w_c, z-loss s and cap c, with everything on the capped logits
        z'_j = c tanh(z_j / c) (z' = z without a cap), lse = logsumexp(z') and p = softmax(z'):

            loss = (1 - lam) w_k (lse - z'_k) + (lam / V) sum_j w_j (lse - z'_j) + s w_k lse^2
            grad_j = grad_scale (A p_j - (lam / V) w_j - (1 - lam) w_k onehot_j(k)) (1 - (z'_j / c)^2)
                     with A = (1 - lam) w_k + (lam / V) W + 2 s w_k lse

        (PyTorch's ``weight`` semantics with label smoothing, plus the z-loss weighted by w_k; the
        last factor is the cap's chain rule, 1 without a cap). With every option off this is
        ``forward``'s loss and gradient. Ignored rows: loss 0 and a zero gradient.

        Args:
            logits, target, label_smoothing, ignore_index, grad, grad_scale: as in ``forward``
                (``grad`` may be ``logits`` itself: each row's logits are read before it is written).
            recipe: the options (``Recipe``).
            lse: an (N,) buffer of the loss dtype, or None; when given it receives lse for every
                row, ignored rows too.

        Returns:
            (N,) per-row loss, float32 (float64 for float64 logits), 0 on ignored rows.

        The default works in plain torch ops on blocks of rows (``torch_defaults.forward_recipe``).
        """
        return torch_defaults.forward_recipe(
            logits, target, label_smoothing, ignore_index, grad, grad_scale, recipe, lse
        )

    def loss_and_grad(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        label_smoothing: float,
        ignore_index: int,
        reduction: str,
        compute_grad: bool,
        normalizer: torch.Tensor | None = None,
        recipe: Recipe | None = None,
        lse: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The op's forward: (loss, kept gradient, backward factor) for 2-D ``logits`` (N >= 1, V).

        loss: (N,) for "none", 0-d for "sum"/"mean", in ``loss_dtype``. "mean" divides the sum of
        the rows by ``normalizer`` where one is given (a 0-d tensor of ``loss_dtype`` on the
        logits' device, read on the device: <= 0 gives loss 0 and a zero gradient), else by the
        count of non-ignored targets (none counted: loss 0, not NaN). The kept gradient (or None
        without ``compute_grad``) has the logits' dtype and holds grad_scale x d loss / d logits
        (``smoothce.numerics.kept_factors``); backward multiplies it by dO x ``factor`` (0-d, on
        the device). The default runs ``forward`` and reduces with torch; a backend may fuse the
        count and the reduction into its kernels.
        """
        forward = self.forward
        if wants_recipe(recipe, lse is not None):
            forward = functools.partial(self.forward_recipe, recipe=recipe or Recipe(), lse=lse)
        return torch_defaults.loss_and_grad(
            forward, logits, target, label_smoothing, ignore_index, reduction, compute_grad, normalizer
        )

    def scale_grad(
        self, grad: torch.Tensor, grad_out: torch.Tensor, factor: torch.Tensor, per_row: bool, inplace: bool
    ) -> torch.Tensor:
        """Backward: dO x ``factor`` x the kept ``grad``, computed in float32 (float64) and rounded once.

        ``grad_out`` is 0-d, or (N,) for a "none" loss (``per_row``). In place, the result is
        ``grad`` itself; otherwise a new tensor. On CPU a product of exactly 1 in place is seen
        for free and skips the pass (``loss.backward()`` of a "mean" or "sum" loss).
        """
        return torch_defaults.scale_grad(grad, grad_out, factor, per_row, inplace)

    def __repr__(self) -> str:
        return f"<smoothce backend {self.name!r} for {self.device_type!r} tensors>"

    # -----------------------------------------------------------------------------------------
    # The two halves of the vocabulary-parallel loss (smoothce.distributed). A rank holds the
    # columns [start, start + V_i) of the logits, V = sum of the V_i is the global vocabulary.

    def shard_stats(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        start: int | torch.Tensor,
        label_smoothing: float,
        ignore_index: int,
        recipe: Recipe | None = None,
    ) -> torch.Tensor:
        """Per-row statistics of one slice of the classes, each relative to the slice's own max.

        With z the slice's row (columns j = 0 .. V_i - 1 are the global classes start + j), capped
        first where ``recipe.softcap`` = cap is set (z_j <- cap tanh(z_j / cap), as in
        ``forward_recipe``), w the slice's class weights (ones without ``recipe.weight``), k the
        global target and lam the smoothing:

            m = max_j z_j                                   (-inf for an all -inf row)
            R = sum_{j != a} exp(z_j - m),  a one column holding m   (S_i = 1 + R; the
                max's exact 1 is left out so that rows where it dominates keep R's digits)
            t = sum_j w_j (z_j - m~),  m~ = m where finite, else 0    (only when lam > 0, else 0)
            z_k = z_{k - start} when start <= k < start + V_i and k != ignore_index, else 0

        Nothing here is summed over raw logits, so logits sharing a large offset lose no digits.

        Args:
            logits: (N, V_i) float16/bfloat16/float32/float64, any strides, V_i >= 1.
            target: (N,) int32/int64 global class ids, contiguous; already checked to lie in
                [0, V) or be ``ignore_index``.
            start: global class of column 0: a Python int, or a 0-d int64 tensor on the logits'
                device (accelerators: no host sync).
            label_smoothing: lam in [0, 1]. ignore_index: as in ``forward``.
            recipe: None or a ``Recipe`` whose ``weight`` is this SLICE's (V_i,) weights (its
                ``z_loss`` plays no part here). ``smoothce.distributed`` passes it only when it is
                not ``plain``, so a backend written before the recipe still serves the plain loss.

        Returns:
            (4, N) float32 (float64 for float64 logits): the rows m, R, t, z_k.
        """
        return torch_defaults.shard_stats(logits, target, start, label_smoothing, ignore_index, recipe)

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
        recipe: Recipe | None = None,
        lse: torch.Tensor | None = None,
        target_weight: torch.Tensor | None = None,
        total_weight: torch.Tensor | None = None,
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

        With a ``recipe`` (not ``plain``), ``forward_recipe``'s gradient of the global row: z is the
        capped row z' (cap = ``recipe.softcap``; M, S and p of z'), w_j the slice's weights, w_k the
        target's weight (``target_weight``, from the rank holding k; 1 without weights), W = the sum
        of all V weights (``total_weight``; V without weights) and s the z-loss:

            grad_j = c (A p_j - (lam / V) w_j) (1 - (z'_j / cap)^2)        j != k - start
            grad_k = c (B p_k - (lam / V) w_k - (1 - lam) w_k (1 - p_k)) (1 - (z'_k / cap)^2)
                     B = (lam / V) W + 2 s w_k lse,  A = (1 - lam) w_k + B,  1 - p_k = e / S where
                     z'_k = M and e < 1 (the confident row's digits, as above)

        (the cap's factor is 1 without a cap).

        Args:
            logits, target, start, label_smoothing, ignore_index: as in ``shard_stats``.
            num_classes: V, the GLOBAL vocabulary size (Python int or 0-d int64 tensor).
            row_max, excess: (N,) M and e, float32 (float64 for float64 logits).
            grad_scale: 0-d tensor on the logits' device, the factor c.
            grad: (N, V_i) output in the logits' dtype, any strides (may be ``logits`` itself).
            recipe: as in ``shard_stats`` (the slice's weights); then also
            lse: (N,) the rows' global lse = M~ + log S, used where ``recipe.z_loss`` > 0.
            target_weight: (N,) w_k of every row (0 on ignored rows), where ``recipe.weight`` is set.
            total_weight: 0-d W, where ``recipe.weight`` is set and lam > 0.
            (All three in the loss dtype on the logits' device.)
        """
        torch_defaults.shard_grad(
            logits,
            target,
            start,
            num_classes,
            row_max,
            excess,
            label_smoothing,
            ignore_index,
            grad_scale,
            grad,
            recipe,
            lse,
            target_weight,
            total_weight,
        )
