"""Tests of the vocabulary-parallel Triton kernels (backends/triton_shard_kernels.py).

``shard_stats`` and ``shard_grad`` of both Triton backends are compared with the float64
truth of their contract (``Backend.shard_stats``/``shard_grad`` in backends/base.py) and
with the plain-torch defaults there. Without a GPU they run on CPU tensors in Triton's
interpreter:

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_shard_kernels.py

With a CUDA or XPU device (TRITON_INTERPRET unset) the same tests run on it. Blocks are
capped at 16 columns, so small slices still take the multi-block loop, its masked tail
and the running-max updates. The last test runs the whole vocabulary-parallel loss on two
gloo ranks through the cuda-triton backend in the interpreter.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed: pip install 'smoothce[triton]'", allow_module_level=True)

from smoothce import registry
from smoothce.backends.base import Backend, loss_dtype
from smoothce.backends.triton_backend import interpreter_enabled
from smoothce.reference import cross_entropy_reference

INTERPRET = interpreter_enabled()
if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
elif getattr(torch, "xpu", None) is not None and torch.xpu.is_available():
    DEVICE = "xpu"
else:
    pytest.skip(
        "the Triton kernels need TRITON_INTERPRET=1 (CPU tensors in Triton's interpreter) or a CUDA/XPU device",
        allow_module_level=True,
    )

BACKENDS = ["cuda-triton", "xpu-triton"] if DEVICE == "cpu" else [f"{DEVICE}-triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# V_i: 1 (the slice is its own max), 13 (one block with a masked tail), 40 (16 + 16 + 8).
LOCAL_SIZES = [1, 13, 40]
# Global classes around the slice: 9 before it and 11 after, so targets fall inside and outside.
BEFORE, AFTER = 9, 11
DEFAULT = Backend()  # the plain-torch defaults


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The Triton backend under test, with blocks of 16 columns."""
    chosen = registry.get(request.param)
    monkeypatch.setattr(chosen, "max_block_v", 16)
    return chosen


def make_rows(n_rows, local, dtype, *, seed=0):
    """Full rows (N, V) in float64 holding ``dtype``-rounded values, targets, and the slice's columns.

    Row 0 targets the slice's first class, row 1 is ignored, row 2 targets its last class with
    its logit raised by 12 (p_k near 1), row 3 has its max twice (the second one counts as an
    exact 1), row 4 targets a class before the slice, row 5 one after it.
    """
    num_classes = BEFORE + local + AFTER
    gen = torch.Generator().manual_seed(seed)
    full = 4 * torch.randn(n_rows, num_classes, generator=gen, dtype=torch.float64)
    target = torch.randint(0, num_classes, (n_rows,), generator=gen)
    own = slice(BEFORE, BEFORE + local)
    target[0] = BEFORE
    target[1] = -100
    target[2] = BEFORE + local - 1
    full[2, target[2]] += 12
    full[3, own] = full[3, own].clamp_max(5.0)
    full[3, BEFORE] = full[3, BEFORE + local - 1] = 5.0
    target[4] = 3
    target[5] = num_classes - 2
    return full.to(dtype).double(), target, own


def true_stats(full, target, own, lam):
    """The contract's (4, N) rows m, R, t, z_k of the slice, in float64."""
    x = full[:, own]
    m, first = x.max(dim=1, keepdim=True)
    shift = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.exp(x - shift).scatter(1, first, 0.0)
    t = (x - shift).sum(1) if lam > 0 else torch.zeros(x.shape[0], dtype=x.dtype)
    k = target - own.start
    owned = (target != -100) & (k >= 0) & (k < x.shape[1])
    z_k = torch.where(owned, x.gather(1, torch.where(owned, k, 0)[:, None])[:, 0], 0.0)
    return torch.stack([m[:, 0], e.sum(1), t, z_k])


def global_stats(full):
    """(M, e): the whole rows' max and the excess S - 1 of S = sum exp(z - M), in float64."""
    m = full.amax(1)
    return m, torch.exp(full - m[:, None]).sum(1) - 1.0


def stats_tolerance(dtype):
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-6, "atol": 2e-6}


def grad_tolerance(dtype):
    # One rounding to the dtype (the interpreter truncates to 16 bits: one ulp), after float32 work.
    if dtype == torch.float64:
        return {"rtol": 1e-12, "atol": 1e-14}
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-7}
    return {"rtol": 2 * torch.finfo(dtype).eps, "atol": 1e-7}


@pytest.mark.parametrize("start_as_tensor", [False, True], ids=["int", "tensor"])
@pytest.mark.parametrize("lam", [0.0, 0.1])
@pytest.mark.parametrize("local", LOCAL_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shard_stats(backend, dtype, local, lam, start_as_tensor):
    full, target, own = make_rows(6, local, dtype)
    logits = full[:, own].to(DEVICE, dtype)
    start = torch.tensor(own.start, device=DEVICE) if start_as_tensor else own.start
    stats = backend.shard_stats(logits, target.to(DEVICE), start, lam, -100)
    assert stats.shape == (4, 6)
    assert stats.dtype == loss_dtype(dtype)
    torch.testing.assert_close(stats.cpu().double(), true_stats(full, target, own, lam), **stats_tolerance(dtype))
    default = DEFAULT.shard_stats(logits, target.to(DEVICE), start, lam, -100)
    torch.testing.assert_close(stats, default, **stats_tolerance(dtype))


@pytest.mark.parametrize("vocab_as_tensor", [False, True], ids=["int", "tensor"])
@pytest.mark.parametrize("lam", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("local", LOCAL_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shard_grad(backend, dtype, local, lam, vocab_as_tensor):
    # The slice of the single-process gradient, times a scale, from the whole rows' M and e.
    full, target, own = make_rows(6, local, dtype)
    num_classes = full.shape[1]
    acc = loss_dtype(dtype)
    row_max, excess = (x.to(DEVICE, acc) for x in global_stats(full))
    logits = full[:, own].to(DEVICE, dtype)
    if vocab_as_tensor:
        start, vocab = torch.tensor([own.start, num_classes], device=DEVICE).unbind(0)
    else:
        start, vocab = own.start, num_classes
    scale = torch.tensor(0.25, dtype=acc, device=DEVICE)
    grad = torch.full_like(logits, float("nan"))
    backend.shard_grad(logits, target.to(DEVICE), start, vocab, row_max, excess, lam, -100, scale, grad)
    _, ref = cross_entropy_reference(full, target, label_smoothing=lam, reduction="sum")
    torch.testing.assert_close(grad.cpu().double(), 0.25 * ref[:, own], **grad_tolerance(dtype))
    default = torch.full_like(logits, float("nan"))
    DEFAULT.shard_grad(logits, target.to(DEVICE), start, vocab, row_max, excess, lam, -100, scale, default)
    torch.testing.assert_close(grad, default, **grad_tolerance(dtype))


def _transposed(logits):
    return logits.t().contiguous().t()  # column stride N


def _padded(logits):
    wide = torch.zeros(logits.shape[0], logits.shape[1] + 5, dtype=logits.dtype, device=logits.device)
    wide[:, 3 : 3 + logits.shape[1]] = logits
    return wide[:, 3 : 3 + logits.shape[1]]  # row stride V_i + 5


@pytest.mark.parametrize("layout", [_transposed, _padded], ids=lambda f: f.__name__[1:])
def test_strided_inputs_and_outputs(backend, layout):
    full, target, own = make_rows(6, 40, torch.float32)
    logits = layout(full[:, own].to(DEVICE, torch.float32))
    assert not logits.is_contiguous()
    stats = backend.shard_stats(logits, target.to(DEVICE), own.start, 0.1, -100)
    expected = true_stats(full, target, own, 0.1)
    torch.testing.assert_close(stats.cpu().double(), expected, **stats_tolerance(torch.float32))
    row_max, excess = global_stats(full)
    # Strided M and e (columns of a (N, 2) tensor) and a transposed gradient buffer.
    both = torch.stack([row_max, excess], 1).float().to(DEVICE)
    grad = _transposed(torch.empty_like(logits))
    backend.shard_grad(logits, target.to(DEVICE), own.start, full.shape[1], both[:, 0], both[:, 1], 0.1, -100,
                       torch.tensor(1.0, device=DEVICE), grad)
    _, ref = cross_entropy_reference(full, target, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(grad.cpu().double(), ref[:, own], **grad_tolerance(torch.float32))


def test_int32_targets_and_an_ignore_index_that_is_a_class(backend):
    # ignore_index=12 is a class of the slice: rows targeting it are ignored (z_k = 0, zero gradient).
    full, target, own = make_rows(6, 40, torch.float32)
    target[1] = 12
    logits = full[:, own].to(DEVICE)
    t32 = target.to(DEVICE, torch.int32)
    stats = backend.shard_stats(logits, t32, own.start, 0.1, 12)
    torch.testing.assert_close(stats, DEFAULT.shard_stats(logits, t32, own.start, 0.1, 12), rtol=2e-6, atol=2e-6)
    assert float(stats[3, 1]) == 0.0
    row_max, excess = (x.float().to(DEVICE) for x in global_stats(full))
    grad = torch.empty_like(logits)
    backend.shard_grad(logits, t32, own.start, full.shape[1], row_max, excess, 0.1, 12,
                       torch.tensor(1.0, device=DEVICE), grad)
    _, ref = cross_entropy_reference(full, target, label_smoothing=0.1, ignore_index=12, reduction="sum")
    torch.testing.assert_close(grad.cpu().double(), ref[:, own], **grad_tolerance(torch.float32))
    assert not grad[1].any()


def test_edge_rows(backend):
    # Rows where float32 loses digits unless the sums are relative to the (running) max.
    local = 64  # four blocks of 16
    rows = torch.zeros(7, local, dtype=torch.float64)
    rows[0] = 30000.0  # a shared offset: m = 30000, R = 63, t = 0 exactly
    rows[1] = -3e4 + torch.randn(local, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows[2, 50] = 19.45  # confident, max in the last block: R = 63 exp(-19.45), never added to a 1
    rows[3, 5] = rows[3, 40] = 19.45  # the max twice, in different blocks: R = 1 + 62 exp(-19.45)
    rows[4, 20:] = float("-inf")  # -inf columns after the max: R, t finite then -inf
    rows[5] = float("-inf")  # an all -inf slice: m = -inf, R = 0, t = -inf
    rows[6, :30] = float("-inf")  # -inf first, the max in a later block: t = -inf
    rows[6, 35] = 3.0
    rows = rows.float().double()
    target = torch.tensor([3, 70, 50, 5, 2, -100, 35])
    own = slice(0, local)
    logits = rows.to(DEVICE, torch.float32)
    stats = backend.shard_stats(logits, target.to(DEVICE), 0, 0.1, -100).cpu().double()
    expected = true_stats(rows, target, own, 0.1)
    torch.testing.assert_close(stats, expected, rtol=1e-6, atol=0.0)
    assert stats[:, 0].tolist() == [30000.0, 63.0, 0.0, 30000.0]


def test_confident_target_column(backend):
    # p_k - 1 for p_k near 1 taken as -e / S: relative precision, where float32 p_k - 1 keeps none.
    # (Also lam = 1 with a flat row: p_k - 1/V is exact, the form (p_k - 1) + (1 - 1/V) is not.)
    local = 70
    full = torch.zeros(3, local, dtype=torch.float64)
    full[0, 0] = 19.45
    full[1, 69] = 25.0
    target = torch.tensor([0, 69, 4])
    row_max, excess = global_stats(full)
    for lam in (0.0, 0.1, 1.0):
        grad = torch.empty(3, local, device=DEVICE)
        backend.shard_grad(full.float().to(DEVICE), target.to(DEVICE), 0, local, row_max.float().to(DEVICE),
                           excess.float().to(DEVICE), lam, -100, torch.tensor(1.0, device=DEVICE), grad)
        _, ref = cross_entropy_reference(full, target, label_smoothing=lam, reduction="sum")
        torch.testing.assert_close(grad.cpu().double(), ref, rtol=1e-5, atol=1e-12)


def test_no_rows(backend):
    logits = torch.empty(0, 5, device=DEVICE)
    target = torch.empty(0, dtype=torch.int64, device=DEVICE)
    assert backend.shard_stats(logits, target, 0, 0.1, -100).shape == (4, 0)
    grad = torch.empty_like(logits)
    empty = torch.empty(0, device=DEVICE)
    backend.shard_grad(logits, target, 0, 5, empty, empty, 0.1, -100, torch.tensor(1.0, device=DEVICE), grad)


def test_start_on_another_device_is_a_clear_error(backend):
    if DEVICE == "cpu":
        pytest.skip("needs a device other than the CPU")
    logits, target = torch.randn(2, 5, device=DEVICE), torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="start must be a Python int or a 0-d int64 tensor"):
        backend.shard_stats(logits, target, torch.tensor(0), 0.1, -100)


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.skipif(DEVICE != "cpu", reason="the GPU runs the vocabulary-parallel loss in test_distributed.py")
def test_vocab_parallel_loss_through_the_interpreter(tmp_path):
    # Two gloo ranks with SMOOTHCE_BACKEND=cuda-triton: vp_stats and vp_loss_grad run these kernels.
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    import _dist_worker

    results = _dist_worker.launch(2, ["triton_interpret"], timeout=280, tmp_path=tmp_path)
    failures = "\n".join(f"rank {rank}: {msg}" for rank, msgs in sorted(results.items()) for msg in msgs)
    assert not failures, f"failures through cuda-triton in the interpreter:\n{failures}"
