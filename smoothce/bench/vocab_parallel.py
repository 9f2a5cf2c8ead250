"""``python -m smoothce.bench.vocab_parallel``: the bytes the vocabulary-parallel loss all-reduces (recorded, not
assumed) and its time on rank 0 against ``smoothce.cross_entropy`` on the full logits; ``launch`` starts the ranks."""

from __future__ import annotations

import argparse
import datetime
import os
import queue
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.benchmark import Timer

import smoothce
from smoothce.bench import machine
from smoothce.distributed import vocab_parallel_cross_entropy

COLLECTIVES = {"all_reduce", "all_reduce_", "all_reduce_coalesced", "all_gather_into_tensor", "broadcast"}
COLLECTIVES |= {"all_gather_into_tensor_coalesced", "reduce_scatter_tensor", "all_to_all_single"}
LABEL_SMOOTHING = 0.1


class CollectiveRecorder(TorchDispatchMode):
    """Records (op name, bytes of its input) for every functional collective issued inside it."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("_c10d_functional", "c10d_functional") and func._opname in COLLECTIVES:
            tensors = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            self.calls.append((func._opname, sum(t.numel() * t.element_size() for t in tensors)))
        return func(*args, **(kwargs or {}))

    @property
    def total_bytes(self) -> int:
        return sum(nbytes for _, nbytes in self.calls)


def _rank_main(rank, fn, world, port, backend, args, results):
    """One rank: join the group (gloo over loopback on the CPU, NCCL on GPU ``rank``), run ``fn``, report."""
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's pairs on loopback, not only its store
    device, extra = torch.device("cpu"), {}
    if backend == "nccl":
        device = extra["device_id"] = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    address, timeout = f"tcp://127.0.0.1:{port}", datetime.timedelta(seconds=120)
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=world, timeout=timeout, **extra)
    try:
        results.put((rank, fn(rank, world, device, *args)))
    finally:
        dist.destroy_process_group()


def launch(fn, world: int, *args, backend: str = "gloo", timeout_s: float = 600.0) -> list:
    """``[fn(rank, world, device, *args) for rank in range(world)]``, a process per rank; a failed one: RuntimeError."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Queue()
    ranks = mp.start_processes(_rank_main, (fn, world, port, backend, args, results), world, join=False)
    deadline, values = time.monotonic() + timeout_s, {}
    try:
        while len(values) < world:
            try:
                values.update([results.get(timeout=1.0)])  # (rank, value)
            except queue.Empty:
                ranks.join(timeout=0)  # raises when a rank failed
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the ranks ran past {timeout_s:.0f} s") from None
        ranks.join()
    except ProcessException as error:
        raise RuntimeError(f"rank {error.error_index} failed:\n{error}") from None
    finally:
        for process in ranks.processes:
            process.kill()  # nothing where it has exited
    return [values[r] for r in range(world)]


def _seconds_per_step(loss, logits, target, repeat: int) -> float:
    """Mean seconds per forward + backward of ``loss``, gradient dropped first: ``repeat`` runs after 2 warm-ups."""

    def step():
        logits.grad = None
        loss(logits, target, label_smoothing=LABEL_SMOOTHING).backward()

    return Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads()).timeit(repeat).mean


def _rank(rank: int, world: int, device: torch.device, args: argparse.Namespace) -> list:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dtype, repeat, out = getattr(torch, args.dtype), args.repeat, []
    for num_classes in args.vocab:
        for rows in args.rows:
            generator = torch.Generator().manual_seed(1234)
            full = torch.randn(rows, num_classes, generator=generator).to(device, dtype)
            target = torch.randint(0, num_classes, (rows,), generator=generator).to(device)
            shard = full.tensor_split(world, dim=1)[rank].clone().requires_grad_()  # an even slice of the vocabulary
            full.requires_grad_()
            recorders = {n: CollectiveRecorder() for n in (1, rows)}  # bytes = fixed + per row * rows
            for n, recorder in recorders.items():
                with recorder:
                    vocab_parallel_cross_entropy(shard[:n], target[:n], label_smoothing=LABEL_SMOOTHING).backward()
            per_row = (recorders[rows].total_bytes - recorders[1].total_bytes) / max(rows - 1, 1)
            t_ours = _seconds_per_step(vocab_parallel_cross_entropy, shard, target, repeat)
            dist.barrier()
            t_single = _seconds_per_step(smoothce.cross_entropy, full, target, repeat) if rank == 0 else float("nan")
            dist.barrier()
            fixed, calls = recorders[rows].total_bytes - per_row * rows, len(recorders[rows].calls)
            gather = (num_classes - shard.shape[1]) * full.element_size()  # bytes per row from the other ranks
            mib = full.numel() * full.element_size() / 2**20
            out.append(  # one row of main's table
                f"| {num_classes} | {rows} | {calls} | {per_row:.0f} | {fixed:.0f} | {gather} | {mib:.1f} "
                f"| {t_ours * 1e3:.3g} | {t_single * 1e3:.3g} |"
            )
    return out


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m smoothce.bench.vocab_parallel", description=__doc__)
    for name, default in (("vocab", [32000, 128256, 262144]), ("rows", [64, 256]), ("world", 2), ("repeat", 3)):
        parser.add_argument(f"--{name}", type=int, nargs="+" if isinstance(default, list) else None, default=default)
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the ranks are killed")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    if min(args.world, args.repeat, *args.rows) < 1 or min(args.vocab) < args.world:
        parser.error(f"--world, --repeat and every --rows must be >= 1, every --vocab >= --world, got {vars(args)}")
    if args.backend == "nccl" and args.world > torch.cuda.device_count():
        parser.error(f"--backend nccl --world {args.world} needs {args.world} GPUs, {torch.cuda.device_count()} here")
    env = machine.describe(torch.device("cpu" if args.backend == "gloo" else "cuda"))
    env["torch_threads"] = max(1, (os.cpu_count() or 1) // args.world)  # each rank's, as _rank sets them
    ranks = launch(_rank, args.world, args, backend=args.backend, timeout_s=args.timeout)
    header = "| V | rows | all-reduces | stats B/row | fixed B/call | gather B/row | full logits MiB/rank "
    header += "| vocab-parallel ms | full logits, one process, ms |\n" + "|---:" * 9 + "|"
    text = (
        f"Vocabulary-parallel cross-entropy, {args.world} {args.backend} rank(s) on "
        f"{'CPU' if args.backend == 'gloo' else 'GPUs'}, {args.dtype} logits, label_smoothing={LABEL_SMOOTHING}, "
        f"forward + backward. {machine.text(env)}\n\n{header}\n" + "\n".join(ranks[0]) + "\n\n"
        "stats B/row and fixed B/call: the bytes all-reduced by one forward + backward, recorded at 1 row and at "
        "`rows`, as fixed + per row x rows (fixed: the per-call shard-size and consistency checks). "
        "gather B/row: bytes each rank would receive per row to all-gather the logits instead; full logits: "
        "the buffer that gathering would materialise on every rank, which the vocabulary-parallel path never "
        "allocates. Times: rank 0, forward + backward steps back to back; the last column is "
        "smoothce.cross_entropy on the full logits in rank 0 alone."
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
