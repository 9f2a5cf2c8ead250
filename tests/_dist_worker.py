"""What each spawned rank runs for tests/test_distributed.py (its own module so `spawn` can import it).

``launch(world, jobs)`` starts ``world`` processes joined by gloo (or NCCL) on
127.0.0.1, runs the named jobs in each, and returns every rank's list of failures
as ``"job/case: what went wrong"`` strings, so the pytest output names the case. A
rank that hangs or dies is a failure too: the process group has a timeout, and the
parent kills whatever is still running after ``timeout`` seconds.

Every rank builds the same full logits from a fixed seed, takes its own slice, and
compares ``vocab_parallel_cross_entropy`` (loss and its slice of the gradient) with
the single-process ``smoothce.cross_entropy`` on the full logits and with the
float64 reference.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import traceback

import torch

PG_TIMEOUT_S = 60


# ---------------------------------------------------------------------------------------------
# Launching.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, jobs: list[str], *, backend: str = "gloo", timeout: float = 150.0, tmp_path=None):
    """Run ``jobs`` on ``world`` ranks; returns {rank: [failure strings]} (a missing rank is a failure)."""
    import tempfile

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out_dir = str(tmp_path) if tmp_path is not None else tempfile.mkdtemp(prefix="smoothce-dist-")
    port = _free_port()
    procs = [
        ctx.Process(target=_main, args=(rank, world, port, backend, jobs, out_dir), daemon=True)
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    results = {}
    for rank, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join(5)
            results[rank] = [f"rank {rank}: still running after {timeout} s (hang?), killed"]
            continue
        path = os.path.join(out_dir, f"rank{rank}.json")
        if not os.path.exists(path):
            results[rank] = [f"rank {rank}: exited with code {p.exitcode} without reporting"]
            continue
        with open(path) as f:
            results[rank] = json.load(f)
    return results


def _loopback_interface():
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    return next((n for n in ("lo", "lo0") if n in names), None)


def _main(rank, world, port, backend, jobs, out_dir):
    failures = []
    os.environ["SMOOTHCE_DIST_OUT"] = out_dir
    try:
        lo = _loopback_interface()
        if lo is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = lo  # gloo's pairs on loopback too, not only the store
        torch.set_num_threads(1)
        import torch.distributed as dist

        kwargs = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            kwargs["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
            **kwargs,
        )
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        for job in jobs:
            failures += [f"{job}/{msg}" for msg in JOBS[job](rank, world, device)]
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        failures.append(f"rank {rank} crashed:\n{traceback.format_exc()}")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(failures, f)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the jobs.


def _slices(sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes, strict=True)]


def _case_data(sizes, rows, dtype, device, *, seed=0, scale=3.0, ignored=(1, 4)):
    """Full logits (rows..., V) and targets hitting the first and last class of every slice."""
    num_classes = sum(sizes)
    gen = torch.Generator().manual_seed(seed)
    shape = rows if isinstance(rows, tuple) else (rows,)
    n = 1
    for d in shape:
        n *= d
    full = (torch.randn(n, num_classes, generator=gen, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, num_classes, (n,), generator=gen)
    # Shard edges are where an off-by-one in the offsets shows: first and last class of each slice.
    edges = [b for s in _slices(sizes) for b in (s.start, s.stop - 1)]
    for i, cls in enumerate(edges[: max(0, n - len(ignored))]):
        target[(i + 2) % n] = cls
    for i in ignored:
        if i < n:
            target[i] = -100
    return full.reshape(*shape, num_classes).to(device), target.reshape(shape).to(device)


def _tolerances(dtype):
    # bf16 gradients are fp32 values rounded to 8 bits: a relative error of 2^-8 each way.
    if dtype == torch.bfloat16:
        return {"rtol": 2**-7, "atol": 1e-6}
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-12}
    return {"rtol": 1e-5, "atol": 1e-6}


def _close(name, actual, expected, failures, **tol):
    try:
        torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), **tol)
    except AssertionError as exc:
        failures.append(f"{name}: {' '.join(str(exc).split())[:300]}")


def _have_single_process_op(device) -> bool:
    from smoothce import registry

    try:
        registry.select(device)
    except (ValueError, RuntimeError):
        return False
    return True


def _check_case(name, rank, sizes, rows, dtype, device, lam, reduction, failures, *, group=None, **data_kw):
    import smoothce
    from smoothce.distributed import vocab_parallel_cross_entropy
    from smoothce.reference import cross_entropy_reference

    full, target = _case_data(sizes, rows, dtype, device, **data_kw)
    own = _slices(sizes)[rank]
    shard = full[..., own].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target, group=group, label_smoothing=lam, reduction=reduction)
    (loss.sum() if reduction == "none" else loss).backward()
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if loss.dtype != expected_dtype or shard.grad.dtype != dtype:
        failures.append(f"{name}: dtypes loss {loss.dtype}, grad {shard.grad.dtype}")
    ref_loss, ref_grad = cross_entropy_reference(full, target, label_smoothing=lam, reduction=reduction)
    tol = _tolerances(dtype)
    loss_tol = tol if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    _close(f"{name} loss vs float64 reference", loss, ref_loss, failures, **loss_tol)
    _close(f"{name} grad vs float64 reference", shard.grad, ref_grad[..., own], failures, **tol)
    if _have_single_process_op(device):
        whole = full.clone().requires_grad_()
        single = smoothce.cross_entropy(whole, target, label_smoothing=lam, reduction=reduction)
        (single.sum() if reduction == "none" else single).backward()
        _close(f"{name} loss vs smoothce.cross_entropy", loss, single, failures, rtol=1e-5, atol=1e-6)
        _close(f"{name} grad vs smoothce.cross_entropy", shard.grad, whole.grad[..., own], failures, **tol)


def _layouts(world):
    # even: the common equal split; uneven: sizes that differ, including a 1-class slice whose
    # max is its only logit, and a V (37 or 25) that no power of two divides.
    if world == 1:
        return {"single": [29]}
    if world == 2:
        return {"even": [16, 16], "uneven": [3, 34]}
    return {"even": [8] * world, "uneven": ([5, 12, 1, 7] + [3] * world)[:world]}


# ---------------------------------------------------------------------------------------------
# Jobs: each returns a list of failure strings for this rank.


def job_values(rank, world, device):
    """Loss and gradient slice for reduction x lam x dtype x layout, plus edge rows."""
    failures = []
    for layout, sizes in _layouts(world).items():
        for dtype in (torch.float32, torch.bfloat16):
            for lam in (0.0, 0.1):
                for reduction in ("none", "sum", "mean"):
                    name = f"{layout} {sizes} {dtype} lam={lam} {reduction}"
                    _check_case(name, rank, sizes, 11, dtype, device, lam, reduction, failures)
    sizes = _layouts(world)["uneven" if world > 1 else "single"]
    # Leading shape (2, 3): the result of "none" keeps it.
    _check_case("3-D logits", rank, sizes, (2, 3), torch.float32, device, 0.1, "none", failures)
    # Every row ignored: "mean" is 0 with a zero gradient, not NaN.
    _check_case("all ignored", rank, sizes, 4, torch.float32, device, 0.1, "mean", failures, ignored=(0, 1, 2, 3))
    # Large logits: the max shift must use the GLOBAL max (exp would overflow otherwise).
    _check_case("large logits", rank, sizes, 6, torch.float32, device, 0.1, "sum", failures, scale=200.0)
    # float64 logits: the statistics travel in float64.
    _check_case("float64", rank, sizes, 7, torch.float64, device, 0.1, "mean", failures)
    failures += _check_minus_inf_slice(rank, world, device)
    return failures


def _check_minus_inf_slice(rank, world, device):
    # A row whose whole slice on rank 0 is -inf (e.g. masked classes): m_0 = -inf, S_0 = 0.
    # (lam = 0: with lam > 0 the loss of such a row is +inf by definition.)
    from smoothce.distributed import vocab_parallel_cross_entropy
    from smoothce.reference import cross_entropy_reference

    failures = []
    sizes = _layouts(world)["uneven" if world > 1 else "single"]
    full, target = _case_data(sizes, 5, torch.float32, device)
    own0 = _slices(sizes)[0]
    full[0, own0] = float("-inf")
    target[0] = sizes[0] if world > 1 else -100  # a class outside rank 0's slice
    full[1] = float("-inf")  # and an ignored row that is -inf everywhere: S = 0, gradient still 0
    target[1] = -100
    own = _slices(sizes)[rank]
    shard = full[:, own].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target, reduction="sum")
    loss.backward()
    # The reference's loss is NaN here (it forms 0 * -inf for lam = 0); its gradient is fine.
    _, ref_grad = cross_entropy_reference(full, target, reduction="sum")
    ref_loss = torch.logsumexp(full.double(), 1) - full.double().gather(1, target.clamp_min(0)[:, None])[:, 0]
    ref_loss = torch.where(target == -100, 0.0, ref_loss).sum()
    _close("-inf slice loss", loss, ref_loss, failures, rtol=1e-5, atol=1e-5)
    _close("-inf slice grad", shard.grad, ref_grad[:, own], failures, **_tolerances(torch.float32))
    return failures


def _split(num_classes, world):
    # Uneven slices (weights 3, 4, 2, 5, ...) that add up to num_classes.
    weights = [(3, 4, 2, 5)[r % 4] for r in range(world)]
    sizes = [num_classes * w // sum(weights) for w in weights]
    sizes[-1] += num_classes - sum(sizes)
    return sizes


def _vp_case(rank, world, full, target, lam, reduction, sizes, device, grad_out=None):
    """Loss and this rank's gradient slice of ``full`` (2-D) through the vocabulary-parallel loss."""
    from smoothce.distributed import vocab_parallel_cross_entropy

    shard = full[:, _slices(sizes)[rank]].to(device).clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target.to(device), label_smoothing=lam, reduction=reduction)
    (loss if grad_out is None else loss * grad_out).sum().backward()
    return loss.detach().cpu(), shard.grad.cpu()


def job_precision(rank, world, device):
    """Rows where float32 loses digits unless everything is relative to the row max (issue 9 section 3)."""
    import math

    from smoothce.reference import cross_entropy_reference

    failures = []
    num_classes = 70000
    sizes = _split(num_classes, world)
    own = _slices(sizes)[rank]
    last = num_classes - 1

    # 70000 equal logits at 30000 with lam = 1: the loss is log V, to float32 rounding (raw sums of
    # z gave 11.15820 for log V = 11.15625); every rank holds the max. lam = 0.1 gives log V too.
    full = torch.full((2, num_classes), 30000.0)
    target = torch.tensor([0, last])
    for lam in (1.0, 0.1):
        loss, grad = _vp_case(rank, world, full, target, lam, "none", sizes, device)
        _close(
            f"offset rows lam={lam} loss",
            loss,
            torch.full((2,), math.log(num_classes)),
            failures,
            rtol=2**-23,
            atol=0.0,
        )
        _, ref_grad = cross_entropy_reference(full, target, label_smoothing=lam, reduction="none")
        _close(f"offset rows lam={lam} grad", grad, ref_grad[:, own], failures, rtol=1e-5, atol=1e-11)

    # -3e4 + randn: relative error of the loss near float32 rounding (raw sums of z gave 3.1e-5).
    gen = torch.Generator().manual_seed(3)
    full = -3e4 + torch.randn(4, num_classes, generator=gen)
    target = torch.tensor([5, last, 40000, -100])
    loss, grad = _vp_case(rank, world, full, target, 0.1, "none", sizes, device)
    ref_loss, ref_grad = cross_entropy_reference(full, target, label_smoothing=0.1, reduction="none")
    _close("offset randn loss", loss, ref_loss, failures, rtol=1e-6, atol=0.0)
    _close("offset randn grad", grad, ref_grad[:, own], failures, rtol=1e-5, atol=1e-11)

    # Confident rows: zeros and one 19.45, so S = 1 + 2.5e-4 (float32 adding the terms to 1 gave
    # 2.3433e-4 for 2.5004e-4). The max on the first rank, on the last, on both (two ranks hold it:
    # S = 2 + ...), and a target away from the max. The target column's gradient is p_k - 1 = -e / S.
    full = torch.zeros(5, num_classes)
    full[0, 0] = full[1, last] = full[2, 0] = full[2, last] = full[3, 0] = 19.45
    full[4, 17] = 19.45
    target = torch.tensor([0, last, 0, 1, 17])
    for lam in (0.0, 0.1):
        loss, grad = _vp_case(rank, world, full, target, lam, "none", sizes, device)
        ref_loss, ref_grad = cross_entropy_reference(full, target, label_smoothing=lam, reduction="none")
        _close(f"confident rows lam={lam} loss", loss, ref_loss, failures, rtol=1e-6, atol=0.0)
        _close(f"confident rows lam={lam} grad", grad, ref_grad[:, own], failures, rtol=1e-5, atol=1e-12)

    # A target on a -inf column with 0 < lam < 1: the loss is +inf (not NaN); the gradient is finite.
    sizes_small = _layouts(world)["uneven" if world > 1 else "single"]
    full, target = _case_data(sizes_small, 4, torch.float32, torch.device("cpu"), ignored=())
    full[0, target[0]] = float("-inf")
    full[2, 0] = float("-inf")  # another -inf logit, not the target: +inf too with lam > 0
    loss, grad = _vp_case(rank, world, full, target, 0.3, "none", sizes_small, device)
    ref_loss, ref_grad = cross_entropy_reference(full, target, label_smoothing=0.3, reduction="none")
    if not (loss[0] == float("inf") and loss[2] == float("inf") and torch.isfinite(loss[[1, 3]]).all()):
        failures.append(f"-inf target column: loss {loss.tolist()}, expected +inf in rows 0 and 2 only")
    _close("-inf target column loss", loss, ref_loss, failures, rtol=1e-5, atol=1e-5)
    _close(
        "-inf target column grad", grad, ref_grad[:, _slices(sizes_small)[rank]], failures, **_tolerances(torch.float32)
    )

    # float16, "mean" over many rows, loss scale 65536: the kept gradient holds 2**15 x the gradient
    # and the 1/count comes in backward, so entries near 1 / (V N) are not flushed to zero.
    full, target = _case_data([32] * world, 2048, torch.float16, torch.device("cpu"))
    loss, grad = _vp_case(rank, world, full, target, 0.1, "mean", [32] * world, device, grad_out=65536.0)
    ref_loss, ref_grad = cross_entropy_reference(full, target, label_smoothing=0.1, reduction="mean")
    expected = (ref_grad[:, _slices([32] * world)[rank]] * 65536).to(torch.float16)
    flushed = int(((grad == 0) & (expected != 0)).sum())
    if flushed:
        failures.append(f"float16 loss scale: {flushed} gradient entries flushed to zero")
    _close("float16 loss scale loss", loss, ref_loss, failures, rtol=1e-5, atol=1e-5)
    _close("float16 loss scale grad", grad, expected, failures, rtol=2 * 2**-10, atol=2 * 2**-24)
    return failures


def job_triton_interpret(rank, world, device):
    """The vocabulary-parallel loss through the cuda-triton backend in Triton's interpreter (CPU tensors)."""
    os.environ["TRITON_INTERPRET"] = "1"  # before this process's first Triton launch
    os.environ["SMOOTHCE_BACKEND"] = "cuda-triton"
    from smoothce import registry

    failures = []
    backend = registry.get("cuda-triton")
    if registry.select(device) is not backend:
        return [f"CPU tensors go to {registry.select(device).name}, not cuda-triton"]
    backend.max_block_v = 16  # small slices still take several blocks
    # The single-process op it is compared with takes its loop kernel: the split kernel's programs
    # wait on each other, which the interpreter, running one program at a time, cannot do.
    backend.kernel = "loop"
    sizes = _layouts(world)["uneven"]
    for dtype in (torch.float32, torch.bfloat16):
        for lam in (0.0, 0.1):
            _check_case(f"{sizes} {dtype} lam={lam}", rank, sizes, 7, dtype, device, lam, "mean", failures)
    failures += _check_minus_inf_slice(rank, world, device)
    # Confident rows and a shared offset over slices of a few blocks each.
    from smoothce.reference import cross_entropy_reference

    sizes = _split(200, world)
    full = torch.zeros(3, 200)
    full[0, 0] = 19.45
    full[1] = 30000.0
    full[2, 199] = 19.45
    target = torch.tensor([0, 150, 199])
    for lam in (0.0, 1.0):
        loss, grad = _vp_case(rank, world, full, target, lam, "none", sizes, device)
        ref_loss, ref_grad = cross_entropy_reference(full, target, label_smoothing=lam, reduction="none")
        _close(f"edge rows lam={lam} loss", loss, ref_loss, failures, rtol=1e-6, atol=0.0)
        _close(f"edge rows lam={lam} grad", grad, ref_grad[:, _slices(sizes)[rank]], failures, rtol=1e-5, atol=1e-11)
    return failures


def job_comm(rank, world, device):
    """Three all-reduces, 16 bytes per row plus a fixed table (13 int64 per rank): the same for every V."""
    from smoothce.bench.vocab_parallel import CollectiveRecorder
    from smoothce.distributed import vocab_parallel_cross_entropy

    failures = []
    seen = {}
    for num_classes in (37 * world, 1000 * world):  # a small and a 27x larger vocabulary
        for rows in (5, 40):
            shard = torch.randn(rows, num_classes // world, device=device, requires_grad=True)
            target = torch.arange(rows, device=device) % num_classes
            recorder = CollectiveRecorder()
            with recorder:
                vocab_parallel_cross_entropy(shard, target, label_smoothing=0.1).backward()
            seen[(num_classes, rows)] = (len(recorder.calls), recorder.total_bytes)
            expected = (3, rows * 16 + world * 13 * 8)
            if seen[(num_classes, rows)] != expected:
                failures.append(
                    f"V={num_classes} rows={rows}: (all-reduces, bytes) {seen[(num_classes, rows)]}, "
                    f"expected {expected}"
                )
    return failures


def _expect_error(name, call, exc_type, fragment, failures):
    try:
        call()
    except exc_type as exc:
        if fragment not in str(exc):
            failures.append(f"{name}: {exc_type.__name__} without {fragment!r}: {exc}")
        return
    except Exception as exc:
        failures.append(f"{name}: expected {exc_type.__name__}, got {type(exc).__name__}: {exc}")
        return
    failures.append(f"{name}: no error")


def job_errors(rank, world, device):
    """Bad input on some or all ranks: the same kind of error on every rank, and no hang."""
    from smoothce.distributed import vocab_parallel_cross_entropy as vp

    failures = []
    sizes = _layouts(world)["uneven" if world > 1 else "single"]
    num_classes = sum(sizes)
    full, target = _case_data(sizes, 6, torch.float32, device)
    own = _slices(sizes)[rank]
    shard = full[:, own].contiguous()
    last = world - 1
    cases = [
        # Rank 0 holds one row fewer: a shape mismatch that would hang a naive all-reduce.
        (
            "mismatched rows",
            lambda: vp(shard[:5] if rank == 0 else shard, target[:5] if rank == 0 else target),
            ValueError,
            "number of rows",
        ),
        # Target == V is in range on no rank; a local-V check would miss it on the last rank.
        (
            "target == V",
            lambda: vp(shard, torch.where(target == -100, num_classes, target)),
            ValueError,
            f"target value {num_classes} is out of range",
        ),
        (
            "negative target",
            lambda: vp(shard, torch.where(target == -100, -5, target)),
            ValueError,
            "target value -5 is out of range",
        ),
        (
            "targets differ across ranks",
            lambda: vp(shard, (target + (rank == last)) % num_classes),
            ValueError,
            "different targets",
        ),
        (
            "dtypes differ across ranks",
            lambda: vp(shard.to(torch.bfloat16) if rank == last else shard, target),
            ValueError,
            "logits dtype",
        ),
        (
            "label_smoothing differs",
            lambda: vp(shard, target, label_smoothing=0.1 * (rank == last)),
            ValueError,
            "label_smoothing",
        ),
        (
            "empty slice on one rank",
            lambda: vp(shard[:, :0] if rank == last else shard, target),
            ValueError,
            "at least one class" if rank == last else "rejected its arguments",
        ),
        # A local argument error on one rank only: that rank's own message, the others are told.
        (
            "integer logits on one rank",
            lambda: vp(shard.long() if rank == last else shard, target),
            TypeError,
            "logits must be float" if rank == last else f"rank {last} of {world} rejected",
        ),
        (
            "bad label_smoothing on one rank",
            lambda: vp(shard, target, label_smoothing=2.0 if rank == last else 0.0),
            ValueError,
            "label_smoothing must be in [0, 1]" if rank == last else "rejected its arguments",
        ),
        (
            "normalizer with reduction='sum'",
            lambda: vp(shard, target, reduction="sum", normalizer=3),
            ValueError,
            "normalizer is only used with reduction='mean'",
        ),
    ]
    needs_two = (
        "mismatched rows",
        "targets differ across ranks",
        "dtypes differ across ranks",
        "label_smoothing differs",
    )
    for name, call, exc_type, fragment in cases:
        if world == 1 and name in needs_two:
            continue  # needs two ranks to disagree
        _expect_error(name, call, exc_type, fragment, failures)
        # The group must still work afterwards: every rank left the failed call at the same point.
        try:
            vp(shard, target)
        except Exception as exc:
            failures.append(f"{name}: the next good call failed: {type(exc).__name__}: {exc}")
    return failures


def job_normalizer(rank, world, device):
    """Tensor x data parallel with gradient accumulation: normalizer = count_tokens over the window."""
    import torch.distributed as dist

    import smoothce
    from smoothce.distributed import count_tokens, vocab_parallel_cross_entropy

    failures = []
    if world != 4:
        return [f"needs world size 4, got {world}"]
    # TP groups {0,1} {2,3} split the vocabulary; DP groups {0,2} {1,3} split the batch.
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    tp, dp = rank % 2, rank // 2
    sizes = [9, 14]
    own = _slices(sizes)[tp]
    # Micro-batches of different lengths and different numbers of ignored rows, so that a
    # per-micro-batch "mean" would weight tokens unequally.
    rows = {(0, 0): 5, (0, 1): 8, (1, 0): 3, (1, 1): 6}
    ignored = {(0, 0): (1,), (0, 1): (0, 2, 3, 7), (1, 0): (), (1, 1): (5,)}
    data = {
        key: _case_data(sizes, n, torch.float32, device, seed=10 + 2 * key[0] + key[1], ignored=ignored[key])
        for key, n in rows.items()
    }
    window = [data[(dp, m)] for m in range(2)]
    n_tokens = count_tokens(torch.cat([t for _, t in window]), group=dp_groups[tp])
    total = sum(int((t != -100).sum()) for _, t in data.values())
    if int(n_tokens) != total:
        failures.append(f"count_tokens gave {int(n_tokens)}, expected {total}")
    # What a single process would compute: "mean" over all rows of all micro-batches.
    everything = torch.cat([f for f, _ in data.values()]).requires_grad_()
    all_targets = torch.cat([t for _, t in data.values()])
    expected = smoothce.cross_entropy(everything, all_targets, label_smoothing=0.1)
    expected.backward()
    offsets = {}
    start = 0
    for key, n in rows.items():
        offsets[key] = slice(start, start + n)
        start += n
    local_sum = torch.zeros((), dtype=torch.float32, device=device)
    for m, (full, target) in enumerate(window):
        shard = full[:, own].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(
            shard, target, group=tp_groups[dp], label_smoothing=0.1, normalizer=n_tokens
        )
        loss.backward()
        local_sum += loss.detach()
        _close(
            f"micro-batch {m} grad",
            shard.grad,
            everything.grad[offsets[(dp, m)], own],
            failures,
            **_tolerances(torch.float32),
        )
    # The window's loss summed over the data-parallel group is the single-process mean.
    dist.all_reduce(local_sum, group=dp_groups[tp])
    _close("window loss", local_sum, expected, failures, rtol=1e-5, atol=1e-6)
    # A plain number works like the tensor, and 0 (a window with no real token) gives 0.
    full, target = window[0]
    shard = full[:, own].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target, group=tp_groups[dp], normalizer=float(total))
    loss.backward()
    ref = smoothce.cross_entropy(full, target, reduction="sum") / total
    _close("float normalizer", loss, ref, failures, rtol=1e-5, atol=1e-6)
    shard.grad = None
    loss = vocab_parallel_cross_entropy(shard, target, group=tp_groups[dp], normalizer=0)
    loss.backward()
    if float(loss) != 0.0 or bool(shard.grad.any()):
        failures.append(f"normalizer=0: loss {float(loss)}, grad nonzero {bool(shard.grad.any())}")
    return failures


def _compile_job(backend):
    def job(rank, world, device):
        """The whole function under torch.compile(fullgraph=True): values, gradient, and a bad target."""
        import torch._dynamo

        from smoothce.distributed import vocab_parallel_cross_entropy

        failures = []
        torch._dynamo.reset()
        compiled = torch.compile(vocab_parallel_cross_entropy, backend=backend, fullgraph=True)
        sizes = _layouts(world)["uneven" if world > 1 else "single"]
        full, target = _case_data(sizes, 9, torch.float32, device)
        own = _slices(sizes)[rank]
        from smoothce.reference import cross_entropy_reference

        for reduction in ("mean", "none"):
            shard = full[:, own].clone().requires_grad_()
            loss = compiled(shard, target, label_smoothing=0.1, reduction=reduction)
            (loss.sum() if reduction == "none" else loss).backward()
            ref_loss, ref_grad = cross_entropy_reference(full, target, label_smoothing=0.1, reduction=reduction)
            _close(f"{reduction} loss", loss, ref_loss, failures, rtol=1e-5, atol=1e-5)
            _close(f"{reduction} grad", shard.grad, ref_grad[:, own], failures, **_tolerances(torch.float32))
        # The checks run inside the compiled graph too: every rank raises.
        bad = torch.where(target == -100, sum(sizes), target)
        _expect_error(
            "bad target",
            lambda: compiled(full[:, own].contiguous(), bad, label_smoothing=0.1),
            ValueError,
            "out of range",
            failures,
        )
        failures += _compile_fused(rank, world, backend)
        return failures

    return job


def _compile_fused(rank, world, backend):
    # The fused LM-head loss under torch.compile(fullgraph=True) against its eager self.
    from smoothce.vocab_parallel_linear import vocab_parallel_linear_cross_entropy

    failures = []
    compiled = torch.compile(vocab_parallel_linear_cross_entropy, backend=backend, fullgraph=True)
    sizes = _split(60, world)
    hidden, weight, b, target = _lm_head_data(60, (9,), 8, torch.float32)
    own = _slices(sizes)[rank]
    for reduction in ("mean", "none"):
        results = []
        for fn in (compiled, vocab_parallel_linear_cross_entropy):
            h, w, bb = (x.clone().requires_grad_() for x in (hidden, weight[own], b[own]))
            loss = fn(h, w, target, bias=bb, label_smoothing=0.1, reduction=reduction)
            (loss.sum() if reduction == "none" else loss).backward()
            results.append((loss.detach(), h.grad, w.grad, bb.grad))
        for what, a, e in zip(("loss", "dhidden", "dweight", "dbias"), *results, strict=True):
            _close(f"fused {reduction} {what}", a, e, failures, rtol=1e-6, atol=1e-7)
    return failures


# ---------------------------------------------------------------------------------------------
# The fused vocabulary-parallel LM-head loss and the DTensor entry points (issue 18).


def _lm_head_data(num_classes, rows, dim, dtype, *, seed=0, bias=True, ignored=(1, 6)):
    """hidden (rows..., D), weight (V, D), bias (V,) or None in ``dtype``; targets with first/last classes."""
    gen = torch.Generator().manual_seed(seed)
    n = 1
    for d in rows:
        n *= d
    hidden = torch.randn(*rows, dim, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(num_classes, dim, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    b = torch.randn(num_classes, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    target = torch.randint(0, num_classes, (n,), generator=gen)
    target[0], target[2] = 0, num_classes - 1
    for i in ignored:
        if i < n:
            target[i] = -100
    return hidden, weight, b, target.reshape(rows)


def _lm_head_reference(hidden, weight, bias, target, lam, reduction, grad_out):
    """Loss and d hidden, d weight, d bias in float64 (F.linear, then the float64 reference loss)."""
    from smoothce.reference import cross_entropy_reference

    h, w = hidden.double().reshape(-1, hidden.shape[-1]), weight.double()
    logits = h @ w.t() + (bias.double() if bias is not None else 0.0)
    loss, d_logits = cross_entropy_reference(logits, target.reshape(-1), label_smoothing=lam, reduction=reduction)
    d_logits = d_logits * (grad_out.double().reshape(-1, 1) if reduction == "none" else float(grad_out))
    grads = (d_logits @ w, d_logits.t() @ h, d_logits.sum(0) if bias is not None else None)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss, grads


def _rel_err(actual, expected):
    # Normwise: the largest error relative to the largest reference entry.
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _check_rel(name, actual, expected, tol, failures):
    if actual.shape != expected.shape:
        failures.append(f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
        return
    err = _rel_err(actual, expected)
    if not err <= tol:
        failures.append(f"{name}: relative error {err:.3g} > {tol:.3g}")


def _lm_head_case(
    name,
    rank,
    world,
    sizes,
    dtype,
    lam,
    reduction,
    failures,
    *,
    rows=(3, 5),
    dim=16,
    bias=True,
    use_dtensor=False,
    chunk_rows=4,
):
    import smoothce
    from smoothce.vocab_parallel_linear import vocab_parallel_linear_cross_entropy

    num_classes = sum(sizes)
    hidden, weight, b, target = _lm_head_data(num_classes, rows, dim, dtype, bias=bias)
    own = _slices(sizes)[rank]
    grad_out = (
        torch.rand(rows, generator=torch.Generator().manual_seed(7)) + 0.5 if reduction == "none" else torch.tensor(1.0)
    )
    h = hidden.clone().requires_grad_()
    budget = chunk_rows * (max(sizes) * dtype.itemsize + 4 * dim) * (1 + 4 // dtype.itemsize)
    with smoothce.linear.settings(chunk_bytes=budget):  # several chunks (each a collective) per call
        if use_dtensor:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import Replicate, Shard, distribute_tensor

            mesh = init_device_mesh("cpu", (world,))
            w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
            bb = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_() if bias else None
            loss = smoothce.dtensor.linear_cross_entropy(
                h, w, target, bias=bb, label_smoothing=lam, reduction=reduction
            )
            if tuple(loss.placements) != (Replicate(),):
                failures.append(f"{name}: loss placements {loss.placements}")
            loss.backward(torch.distributed.tensor.distribute_tensor(grad_out, mesh, [Replicate()]))
            loss = loss.to_local()
            grads = [h.grad, w.grad, bb.grad if bias else None]
            for what, g in (("weight", grads[1]), ("bias", grads[2])):
                if g is not None and tuple(g.placements) != (Shard(0),):
                    failures.append(f"{name}: {what}.grad placements {g.placements}")
            grads = [grads[0], *(g.full_tensor() if g is not None else None for g in grads[1:])]
            own = slice(0, num_classes)
        else:
            w = weight[own].clone().requires_grad_()
            bb = b[own].clone().requires_grad_() if bias else None
            loss = vocab_parallel_linear_cross_entropy(h, w, target, bias=bb, label_smoothing=lam, reduction=reduction)
            loss.backward(grad_out)
            grads = [h.grad, w.grad, bb.grad if bias else None]
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if loss.dtype != expected_dtype or any(g is not None and g.dtype != dtype for g in grads):
        failures.append(f"{name}: dtypes loss {loss.dtype}, grads {[g.dtype for g in grads if g is not None]}")
    ref_loss, ref_grads = _lm_head_reference(hidden, weight, b, target, lam, reduction, grad_out)
    # fp32: the 1e-6. bf16: the logits and every gradient are rounded to 8 bits (as in the
    # single-process loss), and d hidden once more by the all-reduce.
    tol = 1e-6 if dtype == torch.float32 else 2**-7
    _check_rel(f"{name} loss vs float64", loss, ref_loss, tol if dtype == torch.float32 else 2**-8, failures)
    for what, g, ref in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        if ref is not None:
            ref = ref if what == "hidden" else ref[own]
            _check_rel(f"{name} d{what} vs float64", g, ref.reshape(g.shape), 2 * tol, failures)
    # The single-process fused loss on the whole layer, in the same dtype.
    h1 = hidden.clone().requires_grad_()
    w1 = weight.clone().requires_grad_()
    b1 = b.clone().requires_grad_() if bias else None
    single = smoothce.linear_cross_entropy(h1, w1, target, bias=b1, label_smoothing=lam, reduction=reduction)
    single.backward(grad_out)
    _check_rel(
        f"{name} loss vs linear_cross_entropy", loss, single, 1e-6 if dtype == torch.float32 else 2**-8, failures
    )
    _check_rel(f"{name} dhidden vs linear_cross_entropy", grads[0], h1.grad, tol, failures)
    _check_rel(f"{name} dweight vs linear_cross_entropy", grads[1], w1.grad[own], tol, failures)


def job_vp_linear(rank, world, device):
    """The fused loss against float64 and the single-process fused loss: V = 1003 unevenly split."""
    failures = []
    sizes = _split(1003, world)
    for dtype in (torch.float32, torch.bfloat16):
        for lam in (0.0, 0.1):
            for reduction in ("none", "sum", "mean"):
                name = f"{sizes} {dtype} lam={lam} {reduction}"
                _lm_head_case(name, rank, world, sizes, dtype, lam, reduction, failures, bias=reduction != "sum")
    return failures


def job_dtensor_linear(rank, world, device):
    """linear_cross_entropy with a Shard(0) DTensor weight (DTensor's own uneven split of 1003 classes)."""
    from smoothce.dtensor import _slice_sizes

    failures = []
    sizes = _slice_sizes(1003, world)
    for dtype in (torch.float32, torch.bfloat16):
        for lam, reduction in ((0.0, "mean"), (0.1, "none"), (0.1, "sum")):
            _lm_head_case(
                f"DTensor {dtype} lam={lam} {reduction}",
                rank,
                world,
                sizes,
                dtype,
                lam,
                reduction,
                failures,
                use_dtensor=True,
            )
    return failures


def job_dtensor(rank, world, device):
    """smoothce.dtensor.cross_entropy on Shard(-1) logits (DTensor's split of V = 1003), Replicate, and errors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    import smoothce
    from smoothce.dtensor import _slice_sizes
    from smoothce.reference import cross_entropy_reference

    failures = []
    mesh = init_device_mesh("cpu", (world,))
    sizes = _slice_sizes(1003, world)
    for dtype in (torch.float32, torch.bfloat16):
        for lam in (0.0, 0.1):
            for reduction in ("none", "sum", "mean"):
                name = f"Shard(-1) {dtype} lam={lam} {reduction}"
                full, target = _case_data(sizes, (3, 5), dtype, device)
                logits = distribute_tensor(full, mesh, [Shard(2)]).requires_grad_()
                # One case passes the target as a replicated DTensor.
                tgt = distribute_tensor(target, mesh, [Replicate()]) if reduction == "sum" else target
                loss = smoothce.dtensor.cross_entropy(logits, tgt, label_smoothing=lam, reduction=reduction)
                if not isinstance(loss, DTensor) or tuple(loss.placements) != (Replicate(),):
                    failures.append(f"{name}: result {type(loss).__name__} {getattr(loss, 'placements', None)}")
                (loss.sum() if reduction == "none" else loss).backward()
                if tuple(logits.grad.placements) != (Shard(2),):
                    failures.append(f"{name}: grad placements {logits.grad.placements}")
                ref_loss, ref_grad = cross_entropy_reference(full, target, label_smoothing=lam, reduction=reduction)
                tol = _tolerances(dtype)
                _close(f"{name} loss", loss.to_local(), ref_loss, failures, rtol=1e-5, atol=1e-5)
                _close(f"{name} grad", logits.grad.full_tensor(), ref_grad, failures, **tol)
    # Replicate: the single-process op on every rank; its gradient is replicated too.
    full, target = _case_data(sizes, 6, torch.float32, device)
    logits = distribute_tensor(full, mesh, [Replicate()]).requires_grad_()
    loss = smoothce.dtensor.cross_entropy(logits, target, label_smoothing=0.1)
    loss.backward()
    ref_loss, ref_grad = cross_entropy_reference(full, target, label_smoothing=0.1)
    _close("Replicate loss", loss.to_local(), ref_loss, failures, rtol=1e-5, atol=1e-6)
    _close("Replicate grad", logits.grad.to_local(), ref_grad, failures, **_tolerances(torch.float32))
    # A token-count normalizer on the sharded path: the summed loss over it.
    logits = distribute_tensor(full, mesh, [Shard(1)])
    loss = smoothce.dtensor.cross_entropy(logits, target, label_smoothing=0.1, normalizer=torch.tensor(10.0))
    ref = cross_entropy_reference(full, target, label_smoothing=0.1, reduction="sum")[0] / 10
    _close("normalizer", loss.to_local(), ref, failures, rtol=1e-5, atol=1e-6)
    # Other placements: a clear error naming them, on every rank, before any collective.
    for placement, fragment in ((Shard(0), "Shard(dim=0)"), (Partial(), "Partial")):
        bad = DTensor.from_local(
            full[:, _slices(sizes)[rank]] if placement == Shard(0) else full, mesh, [placement], run_check=False
        )
        _expect_error(
            f"{placement} logits",
            lambda bad=bad: smoothce.dtensor.cross_entropy(bad, target),
            ValueError,
            fragment,
            failures,
        )
    sharded_target = distribute_tensor(target, mesh, [Shard(0)]) if target.shape[0] % world == 0 else None
    if sharded_target is not None:
        _expect_error(
            "sharded target",
            lambda: smoothce.dtensor.cross_entropy(distribute_tensor(full, mesh, [Shard(1)]), sharded_target),
            ValueError,
            "Replicate()",
            failures,
        )
    return failures


def job_vp_linear_errors(rank, world, device):
    """Bad inputs to the fused loss: the same error on every rank, no hang, and the group still works."""
    from smoothce.distributed import vocab_parallel_cross_entropy
    from smoothce.vocab_parallel_linear import vocab_parallel_linear_cross_entropy as vpl

    failures = []
    sizes = _split(40, world)
    hidden, weight, _, target = _lm_head_data(40, (6,), 8, torch.float32)
    own = _slices(sizes)[rank]
    w = weight[own].contiguous()
    last = world - 1
    cases = [
        (
            "mismatched rows",
            lambda: vpl(hidden[:5] if rank == 0 else hidden, w, target[:5] if rank == 0 else target),
            ValueError,
            "number of rows",
        ),
        (
            "target == V",
            lambda: vpl(hidden, w, torch.where(target == -100, 40, target)),
            ValueError,
            "target value 40 is out of range",
        ),
        (
            "hidden size differs",
            lambda: vpl(hidden[:, :4] if rank == last else hidden, w[:, :4] if rank == last else w, target),
            ValueError,
            "hidden size D",
        ),
        (
            "hidden grad on one rank only",
            lambda: vpl(hidden.requires_grad_(rank == last), w, target),
            ValueError,
            "which loss is called",
        ),
        (
            "fused on one rank, plain on the others",
            lambda: vpl(hidden, w, target) if rank == last else vocab_parallel_cross_entropy(hidden @ w.t(), target),
            ValueError,
            "which loss is called",
        ),
        (
            "weight of the wrong width on one rank",
            lambda: vpl(hidden, w[:, :5] if rank == last else w, target),
            ValueError,
            "expects D = 5" if rank == last else "rejected its arguments",
        ),
        (
            "normalizer with reduction='none'",
            lambda: vpl(hidden, w, target, reduction="none", normalizer=2),
            ValueError,
            "normalizer is only used with reduction='mean'",
        ),
    ]
    for name, call, exc_type, fragment in cases:
        if world == 1 and name not in ("target == V", "normalizer with reduction='none'"):
            continue
        _expect_error(name, call, exc_type, fragment, failures)
        hidden.requires_grad_(False)
        try:  # every rank left the failed call at the same point: the group still works
            vpl(hidden, w, target)
        except Exception as exc:
            failures.append(f"{name}: the next good call failed: {type(exc).__name__}: {exc}")
    return failures


def job_example(rank, world, device):
    """examples/vocab_parallel_train.py's training runs (one process, DTensor logits, fused) on these ranks."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "vocab_parallel_train.py"
    spec = importlib.util.spec_from_file_location("vocab_parallel_train", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    try:
        example.run(rank, world)  # raises SystemExit naming the run whose losses differ by more than 1e-5
    except SystemExit as exc:
        return [str(exc)]
    return []


def job_sync_free(rank, world, device):
    """Accelerators: no host sync per call (after a first call), and the plain loss captured in a CUDA graph."""
    from smoothce.distributed import vocab_parallel_cross_entropy
    from smoothce.reference import cross_entropy_reference
    from smoothce.vocab_parallel_linear import vocab_parallel_linear_cross_entropy

    failures = []
    sizes = _split(1003, world)
    own = _slices(sizes)[rank]
    full, target = _case_data(sizes, 64, torch.float32, device)
    hidden, weight, _, lm_target = (
        x.to(device) if x is not None else None for x in _lm_head_data(1003, (64,), 32, torch.float32)
    )

    def plain():
        shard = full[:, own].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(shard, target, label_smoothing=0.1, normalizer=torch.tensor(50.0))
        loss.backward()
        return loss

    def fused():
        h, w = hidden.clone().requires_grad_(), weight[own].clone().requires_grad_()
        loss = vocab_parallel_linear_cross_entropy(h, w, lm_target, label_smoothing=0.1, normalizer=7.0)
        loss.backward()
        return loss

    for name, fn in (("plain", plain), ("fused", fused)):
        fn()  # first call: kernels compiled, the fused loss's slice sizes read once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        except RuntimeError as exc:
            failures.append(f"{name}: a host sync: {' '.join(str(exc).split())[:300]}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # CUDA graph: the forward (which makes the kept gradient) captured once and replayed.
    shard = full[:, own].clone().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            vocab_parallel_cross_entropy(shard, target, label_smoothing=0.1)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            captured = vocab_parallel_cross_entropy(shard, target, label_smoothing=0.1)
        shard.data.mul_(0.5)  # new values in the same memory: the replay must see them
        graph.replay()
        torch.cuda.synchronize()
        ref_loss, _ = cross_entropy_reference(full * 0.5, target, label_smoothing=0.1)
        _close("CUDA graph replay loss", captured, ref_loss, failures, rtol=1e-5, atol=1e-5)
    except RuntimeError as exc:
        failures.append(f"CUDA graph capture: {' '.join(str(exc).split())[:300]}")
    return failures


def job_device_assert(rank, world, device):
    """Accelerators: a target == V stops every rank at the device-side assert (no hang); then the process ends.

    The device's state is lost after the assert, so this job writes its result and leaves at once.
    """
    from smoothce.distributed import vocab_parallel_cross_entropy

    sizes = _split(40, world)
    full, target = _case_data(sizes, 6, torch.float32, device)
    bad = torch.where(target == -100, 40, target)
    failures = ["no error from a target == V"]
    try:
        vocab_parallel_cross_entropy(full[:, _slices(sizes)[rank]].contiguous(), bad)
        torch.cuda.synchronize()
    except RuntimeError as exc:
        failures = [] if "assert" in str(exc).lower() else [f"not a device-side assert: {exc}"]
    with open(os.path.join(os.environ["SMOOTHCE_DIST_OUT"], f"rank{rank}.json"), "w") as f:
        json.dump(failures, f)
    os._exit(0)


JOBS = {
    "values": job_values,
    "comm": job_comm,
    "errors": job_errors,
    "normalizer": job_normalizer,
    "precision": job_precision,
    "triton_interpret": job_triton_interpret,
    "compile_aot_eager": _compile_job("aot_eager"),
    "compile_inductor": _compile_job("inductor"),
    "vp_linear": job_vp_linear,
    "dtensor_linear": job_dtensor_linear,
    "dtensor": job_dtensor,
    "vp_linear_errors": job_vp_linear_errors,
    "example": job_example,
    "sync_free": job_sync_free,
    "device_assert": job_device_assert,
}
