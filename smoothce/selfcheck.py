"""The correctness checks of ``python -m smoothce``: smoothce's loss and gradients, and the fused linear
loss's, per dtype and reduction, against float64 and PyTorch; then the cases where rounding is easiest to get
wrong. Each prints its table and returns whether everything is within its bound.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import smoothce
from smoothce import registry
from smoothce.reference import cross_entropy_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# Allowed max |error| against float64, as a multiple of the largest |value|: the loss is fp32;
# the gradient is rounded once to the logits' dtype.
GRAD_BOUND = {"fp32": 1e-5, "bf16": 2.0**-8, "fp16": 2.0**-10, "fp64": 1e-12}
LABEL_SMOOTHING = 0.1  # of the fused linear loss's check


def eager(hidden, weight, target, bias=None, label_smoothing=LABEL_SMOOTHING, reduction="mean"):
    """PyTorch's way to the fused linear loss: the logits materialised, then F.cross_entropy."""
    return F.cross_entropy(F.linear(hidden, weight, bias), target, label_smoothing=label_smoothing, reduction=reduction)


def reference_grads(
    hidden, weight, target, bias=None, label_smoothing=LABEL_SMOOTHING, reduction="mean", round_logits=False
):
    """float64 loss and gradients of linear then cross-entropy, on the given inputs. With ``round_logits`` the
    logits are F.linear's in the inputs' dtype (as every half-precision implementation has them), then float64."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    logits = F.linear(h, w, b)
    if round_logits:
        rounded = F.linear(hidden.detach(), weight.detach(), None if bias is None else bias.detach()).double()
        logits = logits + (rounded - logits).detach()  # the rounded values, float64 gradients
    loss = F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction=reduction)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def relative_error(value, reference) -> float:
    """max |value - reference| / max |reference|; absolute where the reference is (round-off) zero."""
    if reference.numel() == 0:
        return 0.0
    scale = float(reference.abs().max())
    err = float((value.double() - reference.to(value.device)).abs().max())
    return err / scale if scale > 1e-12 else err


def check(device: torch.device) -> bool:
    """smoothce against F.cross_entropy (float32 math) and the float64 reference."""
    generator = torch.Generator().manual_seed(0)
    rows, num_classes = 64, 5003  # odd vocabulary: masked tails everywhere
    base = torch.randn(rows, num_classes, generator=generator, dtype=torch.float64) * 3
    target = torch.randint(0, num_classes, (rows,), generator=generator)
    target[::7] = -100
    ok = True
    print(f"\ncheck on {device} ({rows}x{num_classes}, label_smoothing=0.1, every 7th row ignored),")
    print("max |error| against float64, smoothce and PyTorch's F.cross_entropy:")
    print(f"  {'dtype':5s} {'reduction':9s} {'loss err':>10s} {'torch':>10s} {'grad err':>10s} {'torch':>10s}  result")
    for name, dtype in DTYPES.items():
        for reduction in ("mean", "sum", "none"):
            logits = base.to(dtype)
            ref_loss, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1, reduction=reduction)
            leaf = logits.to(device, copy=True).requires_grad_(True)
            loss = smoothce.cross_entropy(leaf, target.to(device), label_smoothing=0.1, reduction=reduction)
            loss.backward(torch.ones_like(loss))
            torch_leaf = logits.to(device, copy=True).requires_grad_(True)
            expected = F.cross_entropy(torch_leaf, target.to(device), label_smoothing=0.1, reduction=reduction)
            expected.backward(torch.ones_like(expected))
            loss_err = (loss.double().cpu() - ref_loss).abs().max().item()
            torch_loss_err = (expected.double().cpu() - ref_loss).abs().max().item()
            grad_err = (leaf.grad.double().cpu() - ref_grad).abs().max().item()
            torch_err = (torch_leaf.grad.double().cpu() - ref_grad).abs().max().item()
            scale = ref_grad.abs().max().item()
            loss_scale = max(ref_loss.abs().max().item(), 1.0)
            good = loss_err <= 1e-5 * loss_scale and grad_err <= GRAD_BOUND[name] * scale
            ok &= good
            print(
                f"  {name:5s} {reduction:9s} {loss_err:10.2e} {torch_loss_err:10.2e} {grad_err:10.2e} "
                f"{torch_err:10.2e}  {'ok' if good else 'FAIL'}"
            )
    return check_hard_cases(device) and ok


# The recipe options checked by ``check_options``: each alone, then all together.
OPTIONS = {
    "weight": {"weight": True},
    "z_loss=1e-3": {"z_loss": 1e-3},
    "softcap=30": {"softcap": 30.0},
    "all three": {"weight": True, "z_loss": 1e-3, "softcap": 30.0},
}


def composed(logits, target, weight=None, *, label_smoothing=0.1, z_loss=0.0, softcap=None, dtype=torch.float64):
    """PyTorch composing the loss in ``dtype``: F.cross_entropy of c tanh(z / c) with ``weight``, plus
    the z-loss s w_k lse^2 per counted row, weighted mean; (loss, d loss / d logits)."""
    z = logits.detach().to(dtype).requires_grad_(True)
    capped = softcap * torch.tanh(z / softcap) if softcap is not None else z
    w = None if weight is None else weight.to(dtype)
    rows = F.cross_entropy(capped, target, w, label_smoothing=label_smoothing, reduction="none")
    valid = target != -100
    w_k = torch.where(valid, torch.ones_like(rows) if w is None else w[target.clamp_min(0)], 0.0)
    loss = (rows + z_loss * w_k * torch.logsumexp(capped, -1).square()).sum() / w_k.sum()
    loss.backward()
    return loss.detach(), z.grad


def check_options(device: torch.device) -> bool:
    """Class weights, z-loss and soft-capping against PyTorch composed in float64, beside PyTorch's own float32."""
    generator = torch.Generator().manual_seed(2)
    rows, num_classes = (16, 1001) if interpreted(device) else (64, 5003)
    base = torch.randn(rows, num_classes, generator=generator, dtype=torch.float64) * 8  # some capped at 30
    target = torch.randint(0, num_classes, (rows,), generator=generator)
    target[::7] = -100
    weight = 0.25 + 1.75 * torch.rand(num_classes, generator=generator)
    print(f"\nrecipe options on {device} ({rows}x{num_classes}, label_smoothing=0.1, mean), max |error| against")
    print("PyTorch composed in float64 (F.cross_entropy of softcap tanh(z / softcap), weight, + z-loss),")
    print("smoothce and PyTorch composing in float32 (gradient errors relative to the largest entry):")
    print(f"  {'options':12s} {'dtype':5s} {'loss err':>10s} {'torch':>10s} {'grad err':>10s} {'torch':>10s}  result")
    ok = True
    for label, options in OPTIONS.items():
        options = {**options, "weight": weight if options.get("weight") else None}
        for name, dtype in DTYPES.items():
            logits = base.to(dtype)
            exact_loss, exact_grad = composed(logits, target, **options)
            leaf = logits.to(device, copy=True).requires_grad_(True)
            w = None if options["weight"] is None else options["weight"].to(device)
            loss = smoothce.cross_entropy(leaf, target.to(device), **{**options, "weight": w}, label_smoothing=0.1)
            loss.backward()
            fp32 = torch.float64 if dtype == torch.float64 else torch.float32
            torch_loss, torch_grad = composed(logits, target, **options, dtype=fp32)
            loss_err = abs(float(loss.detach()) - float(exact_loss))
            torch_loss_err = abs(float(torch_loss) - float(exact_loss))
            grad_err = relative_error(leaf.grad.cpu(), exact_grad)
            torch_err = relative_error(torch_grad, exact_grad)
            good = loss_err <= max(2 * torch_loss_err, 1e-6 * max(abs(float(exact_loss)), 1.0)) and grad_err <= max(
                2 * torch_err, GRAD_BOUND[name]
            )
            ok &= good
            print(
                f"  {label:12s} {name:5s} {loss_err:10.2e} {torch_loss_err:10.2e} {grad_err:10.2e} "
                f"{torch_err:10.2e}  {'ok' if good else 'FAIL'}"
            )
    return ok


def _fp16_ulps(values: torch.Tensor, expected: torch.Tensor) -> float:
    """max |values - expected| in units of fp16's spacing at |expected| (subnormals: 2**-24)."""
    spacing = torch.exp2(torch.floor(torch.log2(expected.abs().clamp_min(2.0**-14))) - 10)
    return ((values.double() - expected).abs() / spacing).max().item()


def interpreted(device: torch.device) -> bool:
    """Whether smoothce runs on ``device`` through an interpreter (a GPU backend selected for CPU tensors)."""
    return device.type == "cpu" and registry.select(device).name != "cpu"


def _hard_cases(device: torch.device):
    """(label, what is measured, bound, smoothce's error, PyTorch's error) per case."""
    generator = torch.Generator().manual_seed(1)

    def both(logits, target, backward_scale=None, autocast=False, **options):
        results = []
        for fn in (smoothce.cross_entropy, F.cross_entropy):
            leaf = logits.to(device, copy=True).requires_grad_(True)
            with torch.autocast(device.type, dtype=logits.dtype, enabled=autocast):
                loss = fn(leaf, target.to(device), **options)
            if backward_scale is not None:
                (loss * backward_scale).backward()
            results.append((loss.detach().double().cpu(), None if leaf.grad is None else leaf.grad.cpu()))
        return results

    # fp32 logits sharing a large offset, lam > 0: the smoothing term's sum must not carry the offset.
    logits = (-3e4 + torch.randn(16, 32000, generator=generator, dtype=torch.float64)).float()
    target = torch.randint(0, 32000, (16,), generator=generator)
    ref, _ = cross_entropy_reference(logits, target, label_smoothing=0.1, reduction="none")
    errors = [
        ((loss - ref).abs() / ref).max().item()
        for loss, _ in both(logits, target, label_smoothing=0.1, reduction="none")
    ]
    yield "fp32 -3e4 + randn, lam=0.1", "loss rel. err", 1e-6, *errors

    equal = torch.full((1, 70000), 30000.0)
    errors = [
        abs(loss.item() - math.log(70000)) / math.log(70000)
        for loss, _ in both(equal, torch.tensor([0]), label_smoothing=1.0)
    ]
    yield "fp32 70000 logits all 3e4, lam=1", "loss rel. err", 1e-6, *errors

    # lam = 1: the target column is p_k - 1/V, about 1e-5; it must keep its relative precision.
    logits = torch.randn(8, 65536, generator=generator)
    target = torch.randint(0, 65536, (8,), generator=generator)
    _, ref_grad = cross_entropy_reference(logits, target, label_smoothing=1.0, reduction="sum")
    rows = torch.arange(8)
    col = ref_grad[rows, target]
    errors = [
        ((grad[rows, target].double() - col).abs() / col.abs()).max().item()
        for _, grad in both(logits, target, backward_scale=1.0, label_smoothing=1.0, reduction="sum")
    ]
    yield "fp32 V=65536 randn, lam=1", "target col rel. err", 1e-5, *errors

    # A confident row: loss = log1p(69999 exp(-19.45)) = 2.5004e-4, far below fp32's ulp of 1.
    confident = torch.zeros(1, 70000)
    confident[0, 0] = 19.45
    exact = math.log1p(69999 * math.exp(-float(confident[0, 0])))
    errors = [abs(loss.item() - exact) / exact for loss, _ in both(confident, torch.tensor([0]))]
    yield "fp32 confident row (loss 2.5e-4)", "loss rel. err", 1e-6, *errors

    # fp16 logits, mean over N rows, loss x 65536 (loss scaling), PyTorch under autocast: the scaled gradient in
    # fp16 ulps of float64 x 65536. Folding 1/N in first would flush most of it. Smaller where the work is small
    # (CPU) or slow (an interpreter, which runs row by row): p / N still falls below fp16's normal range.
    rows, num_classes = (4096, 32000) if device.type != "cpu" else (1024, 256) if interpreted(device) else (4096, 2048)
    logits = (torch.randn(rows, num_classes, generator=generator) * 3).half()
    target = torch.randint(0, num_classes, (rows,), generator=generator)
    _, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1)
    errors = [
        _fp16_ulps(grad, ref_grad * 65536)
        for _, grad in both(logits, target, backward_scale=65536.0, autocast=True, label_smoothing=0.1)
    ]
    yield f"fp16 {rows}x{num_classes} mean, loss x 65536", "grad err, fp16 ulps", 2.0, *errors


def check_hard_cases(device: torch.device) -> bool:
    """The cases where rounding is easiest to get wrong: smoothce must be within its bound."""
    print(f"\nhard cases on {device}, error against float64 (PyTorch: F.cross_entropy, fp32 math):")
    print(f"  {'case':36s} {'measure':20s} {'smoothce':>10s} {'torch':>10s} {'bound':>8s}  result")
    ok = True
    for label, measure, bound, ours, theirs in _hard_cases(device):
        good = ours <= bound
        ok &= good
        print(f"  {label:36s} {measure:20s} {ours:10.2e} {theirs:10.2e} {bound:8.0e}  {'ok' if good else 'FAIL'}")
    return ok


def check_linear(device: torch.device) -> bool:
    """smoothce.linear_cross_entropy against float64 and PyTorch's F.linear + F.cross_entropy."""
    rows = linear_main_check(device)
    print(f"\nfused linear + cross-entropy on {device}, worst relative error of the loss and of the")
    print("hidden/weight/bias gradients against float64, and PyTorch's gradient error:")
    print("\n".join(format_check_rows(rows)))
    return all(row["ok"] for row in rows)


CHECK_DTYPES = ("fp32", "bf16", "fp16", "fp64")
# Allowed relative error of the loss and gradients. fp32, fp64: against float64. Half precision
# rounds the logits to its dtype (as F.linear does, for PyTorch's path too), an error that
# dwarfs everything after it, so it is checked against float64 from those very logits: what
# remains is the rounding of the chunk's gradient and of the results (fp16's d hidden twice
# where the device has no fp32-output matmul).
CHECK_BOUND = {"fp32": 1e-5, "fp64": 1e-12, "bf16": 2.0**-7, "fp16": 2.0**-9}


def linear_main_check(device) -> list[dict]:
    """smoothce.linear_cross_entropy against float64 and PyTorch's path, per dtype and reduction.

    Rows: {"dtype", "reduction", "loss_err", "grad_err" (worst of hidden, weight, bias),
    "torch_grad_err" (PyTorch's F.linear + F.cross_entropy, same measure), "ok"}; errors are
    relative to the largest |value|, against float64 on the same inputs. "ok" applies
    ``CHECK_BOUND`` (for half precision against float64 from the rounded logits). Small shapes
    with odd D and V, a bias, every 7th row ignored, and chunks of 16 rows so that several
    chunks and a short last one run.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    n, d, v = 70, 33, 1001
    base_h = torch.randn(n, d, generator=generator, dtype=torch.float64)
    base_w = torch.randn(v, d, generator=generator, dtype=torch.float64) / d**0.5
    base_b = torch.randn(v, generator=generator, dtype=torch.float64) * 0.1
    target = torch.randint(0, v, (n,), generator=generator)
    target[::7] = -100
    rows = []
    for name in CHECK_DTYPES:
        dtype = DTYPES[name]
        h, w, b = base_h.to(dtype), base_w.to(dtype), base_b.to(dtype)
        for reduction in ("mean", "sum", "none"):
            ref = reference_grads(h, w, target, b, reduction=reduction)
            ours = _grads(smoothce.linear_cross_entropy, h, w, b, target, device, reduction)
            theirs = _grads(eager, h, w, b, target, device, reduction)
            loss_err = relative_error(ours[0], ref[0])
            grad_err = max(relative_error(g, r) for g, r in zip(ours[1:], ref[1:], strict=True))
            torch_err = max(relative_error(g, r) for g, r in zip(theirs[1:], ref[1:], strict=True))
            half = dtype in (torch.bfloat16, torch.float16)
            near = reference_grads(h, w, target, b, reduction=reduction, round_logits=True) if half else ref
            ok = relative_error(ours[0], near[0]) <= (1e-5 if half else CHECK_BOUND[name]) and all(
                relative_error(g, r) <= CHECK_BOUND[name] for g, r in zip(ours[1:], near[1:], strict=True)
            )
            rows.append(
                {
                    "dtype": name,
                    "reduction": reduction,
                    "loss_err": loss_err,
                    "grad_err": grad_err,
                    "torch_grad_err": torch_err,
                    "ok": ok,
                }
            )
    return rows


def _grads(fn, h, w, b, target, device, reduction):
    leaves = [t.to(device, copy=True).requires_grad_(True) for t in (h, w, b)]
    t = target.to(device)
    with smoothce.linear.settings(chunk_bytes=16 * (w.shape[0] * w.element_size() + 4 * w.shape[1])):
        loss = fn(leaves[0], leaves[1], t, bias=leaves[2], label_smoothing=LABEL_SMOOTHING, reduction=reduction)
    loss.backward(torch.ones_like(loss))
    return [loss.detach().cpu()] + [leaf.grad.cpu() for leaf in leaves]


def format_check_rows(rows: list[dict]) -> list[str]:
    lines = [f"  {'dtype':5s} {'reduction':9s} {'loss err':>10s} {'grad err':>10s} {'torch grad err':>14s}  result"]
    for r in rows:
        lines.append(
            f"  {r['dtype']:5s} {r['reduction']:9s} {r['loss_err']:10.2e} {r['grad_err']:10.2e} "
            f"{r['torch_grad_err']:14.2e}  {'ok' if r['ok'] else 'FAIL'}"
        )
    return lines
