"""A float64 reference written directly from the spec, for tests and the self-check.

Plain and slow on purpose: it materialises everything in float64 and shares no
code with the backends.
"""

from __future__ import annotations

import torch


def cross_entropy_reference(logits, target, *, label_smoothing=0.0, ignore_index=-100, reduction="mean"):
    """Returns (loss, grad) in float64; grad is d loss / d logits, logits-shaped.

    r = log sum_j exp(z_j),  s = sum_j z_j,  o = r - (1 - lam) z_k - (lam / V) s
    do/dz = softmax(z) - lam / V - (1 - lam) onehot(k)
    """
    z = logits.detach().to(torch.float64)
    num_classes = z.shape[-1]
    z = z.reshape(-1, num_classes)
    t = target.reshape(-1).to(torch.int64)
    lam = float(label_smoothing)
    valid = t != ignore_index
    k = torch.where(valid, t, 0)
    r = torch.logsumexp(z, dim=1)
    s = z.sum(dim=1)
    z_k = z.gather(1, k.unsqueeze(1)).squeeze(1) if z.numel() else torch.zeros_like(r)
    # A term whose weight is exactly 0 is absent, not 0 * (-inf) = NaN: a target on a -inf
    # column at lam = 1, or a -inf logit at lam = 0, leaves a finite or +inf loss.
    target_term = (1 - lam) * z_k if lam != 1 else torch.zeros_like(r)
    smoothing_term = lam / num_classes * s if lam != 0 else torch.zeros_like(r)
    o = torch.where(valid, r - target_term - smoothing_term, 0.0)
    p = torch.softmax(z, dim=1)
    onehot = torch.zeros_like(z).scatter_(1, k.unsqueeze(1), 1.0) if z.numel() else torch.zeros_like(z)
    d = torch.where(valid.unsqueeze(1), p - lam / num_classes - (1 - lam) * onehot, 0.0)
    count = int(valid.sum())
    if reduction == "none":
        return o.reshape(target.shape), d.reshape(logits.shape)
    if reduction == "sum":
        return o.sum(), d.reshape(logits.shape)
    if count == 0:
        return o.sum() * 0.0, torch.zeros_like(d).reshape(logits.shape)
    return o.sum() / count, (d / count).reshape(logits.shape)
