"""A float64 reference written directly from the spec, for tests and the self-check.

Plain and slow on purpose: it materialises everything in float64 and shares no
code with the backends.
"""

from __future__ import annotations

import torch


def cross_entropy_reference(
    logits,
    target,
    weight=None,
    *,
    label_smoothing=0.0,
    ignore_index=-100,
    reduction="mean",
    z_loss=0.0,
    softcap=None,
    return_lse=False,
):
    """Returns (loss, grad) in float64 (and lse with ``return_lse``); grad is d loss / d logits.

    With z' = c tanh(z / c) (z' = z without ``softcap``), r = log sum_j exp(z'_j), weights w
    (ones without ``weight``) and z-loss s, a counted row's loss and its gradient are
        o = (1 - lam) w_k (r - z'_k) + (lam / V) sum_j w_j (r - z'_j) + s w_k r^2
        do/dz'_j = (1 - lam) w_k (p_j - onehot_j(k)) + (lam / V) (W p_j - w_j) + 2 s w_k r p_j
        do/dz_j = do/dz'_j (1 - tanh(z_j / c)^2)
    with p = softmax(z'), W = sum_j w_j; "mean" divides by the sum of w_k over counted rows
    (0 there: loss 0, gradient 0). Without options: o = r - (1 - lam) z_k - (lam / V) sum_j z_j.
    """
    z = logits.detach().to(torch.float64)
    num_classes = z.shape[-1]
    z = z.reshape(-1, num_classes)
    t = target.reshape(-1).to(torch.int64)
    lam = float(label_smoothing)
    valid = t != ignore_index
    k = torch.where(valid, t, 0)
    chain = torch.ones_like(z)
    if softcap is not None:
        chain = 1.0 - torch.tanh(z / softcap) ** 2
        z = softcap * torch.tanh(z / softcap)
    w = torch.ones(num_classes, dtype=torch.float64) if weight is None else weight.detach().double().cpu()
    w = w.to(z.device)
    w_k = w[k]
    r = torch.logsumexp(z, dim=1)
    z_k = z.gather(1, k.unsqueeze(1)).squeeze(1) if z.numel() else torch.zeros_like(r)
    # A term whose weight is exactly 0 is absent, not 0 * (-inf) = NaN: a target on a -inf
    # column at lam = 1, or a -inf logit at lam = 0, leaves a finite or +inf loss.
    o = torch.zeros_like(r)
    if lam != 1:
        o = o + (1 - lam) * w_k * (r - z_k)
    if lam != 0:
        o = o + lam / num_classes * (
            (w * (r.unsqueeze(1) - z)).sum(1) if weight is not None else num_classes * r - z.sum(1)
        )
    if z_loss:
        o = o + z_loss * w_k * r**2
    o = torch.where(valid, o, 0.0)
    p = torch.softmax(z, dim=1)
    onehot = torch.zeros_like(z).scatter_(1, k.unsqueeze(1), 1.0) if z.numel() else torch.zeros_like(z)
    a = (1 - lam) * w_k.unsqueeze(1)
    d = a * (p - onehot) + lam / num_classes * (w.sum() * p - w) + 2 * z_loss * (w_k * r).unsqueeze(1) * p
    d = torch.where(valid.unsqueeze(1), d * chain, 0.0)
    lse = r.reshape(target.shape)
    denominator = float((w_k * valid).sum())
    if reduction == "none":
        loss, grad = o.reshape(target.shape), d.reshape(logits.shape)
    elif reduction == "sum":
        loss, grad = o.sum(), d.reshape(logits.shape)
    elif denominator == 0:
        loss, grad = o.sum() * 0.0, torch.zeros_like(d).reshape(logits.shape)
    else:
        loss, grad = o.sum() / denominator, (d / denominator).reshape(logits.shape)
    return (loss, grad, lse) if return_lse else (loss, grad)
