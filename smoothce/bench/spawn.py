"""Run one function on ``world`` processes joined by torch.distributed on 127.0.0.1; collect what each returns.

``launch(fn, world, *args, backend="gloo")`` spawns the ranks, sets each one up (gloo on
the loopback interface and the CPU; NCCL on GPU ``rank``), calls ``fn(rank, world,
device, *args)`` there and returns the results in rank order. A rank that raises, dies
or outlives ``timeout_s`` ends the launch with a RuntimeError that names it (with the
rank's traceback); the ranks still running are killed. ``fn`` and its arguments must be
picklable (``spawn`` imports ``fn``'s module in every rank).
"""

from __future__ import annotations

import datetime
import os
import queue as queue_module
import socket
import time
import traceback

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_interface() -> str | None:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS), for GLOO_SOCKET_IFNAME."""
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    return next((n for n in ("lo", "lo0") if n in names), None)


def _rank_main(fn, rank, world, port, backend, args, results, pg_timeout_s):
    try:
        import torch.distributed as dist

        if loopback_interface() is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()  # gloo's pairs on loopback, not only the store
        device, extra = torch.device("cpu"), {}
        if backend == "nccl":
            device = extra["device_id"] = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout_s), **extra)  # fmt: skip
        try:
            value = fn(rank, world, device, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def launch(fn, world: int, *args, backend: str = "gloo", timeout_s: float = 600.0, pg_timeout_s: float = 120.0):
    """``[fn(rank, world, device, *args) for rank in range(world)]``, each in its own process."""
    import torch.multiprocessing as mp

    if world < 1:
        raise ValueError(f"world must be at least 1, got {world}")
    if backend == "nccl" and world > torch.cuda.device_count():
        raise ValueError(f"NCCL with {world} ranks needs {world} GPUs; {torch.cuda.device_count()} are visible")
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, backend, args, results, pg_timeout_s),
                         daemon=True) for r in range(world)]  # fmt: skip
    for p in procs:
        p.start()
    deadline, values = time.monotonic() + timeout_s, {}
    try:
        while len(values) < world:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in values]
                if dead or time.monotonic() > deadline:
                    why = f"exited with code {procs[dead[0]].exitcode}" if dead else f"ran past {timeout_s:.0f} s"
                    raise RuntimeError(f"rank {dead[0] if dead else 'some'} {why} without reporting") from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            values[rank] = value
    finally:
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()) if len(values) == world else 1.0)
            if p.is_alive():
                p.kill()
    return [values[r] for r in range(world)]
