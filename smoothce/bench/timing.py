"""Timing: a device-generic timer, the interleaved measurement loop, and copy bandwidth.

CPU runs are timed with ``time.perf_counter``; accelerator runs with the device's own
events (``getattr(torch, device.type).Event``), so the same code serves CUDA and XPU.
Before each accelerator run a 256 MiB buffer is zeroed (outside the timed region) so
that no run finds its inputs in the L2 cache left by the previous one.

The loop warms every implementation up (a set number of runs, and more while they
have taken less than a set time, so small cases settle too), then interleaves: repetition r times each
implementation once, starting with implementation r mod k, so slow drifts of the
machine (other processes, clock changes) fall on all implementations alike and no
implementation always runs right after the same other one. It stops after ``reps``
repetitions, or earlier once ``min_reps`` are done and ``budget_s`` seconds have passed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch

FLUSH_BYTES = 256 << 20
MAX_WARMUP_RUNS = 100


class Timer:
    """Times one ``Step`` run on ``device``: seconds from the start of ``run()`` to its end."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.is_cpu = self.device.type == "cpu"
        self.module = None if self.is_cpu else getattr(torch, self.device.type)
        self._flush = None
        if not self.is_cpu:
            self._flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=self.device)

    def synchronize(self) -> None:
        if self.module is not None:
            self.module.synchronize(self.device)

    def measure(self, step) -> float:
        step.prepare()
        if self.is_cpu:
            start = time.perf_counter()
            step.run()
            return time.perf_counter() - start
        self._flush.zero_()
        start = self.module.Event(enable_timing=True)
        end = self.module.Event(enable_timing=True)
        start.record()
        step.run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # events report milliseconds

    def close(self) -> None:
        self._flush = None


class _Copy:
    """A ``Step``-like copy of one buffer into another, for the copy bandwidth."""

    def __init__(self, nbytes: int, device: torch.device):
        self.src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        self.dst = torch.zeros_like(self.src)  # written once, so no page is faulted in while timed

    def prepare(self) -> None:
        pass

    def run(self) -> None:
        self.dst.copy_(self.src)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 10) -> float:
    """Bytes per second of ``dst.copy_(src)`` for an ``nbytes`` buffer: 2 * nbytes moved per copy."""
    timer = Timer(device)
    copy = _Copy(nbytes, device)
    for _ in range(2):
        timer.measure(copy)
    times = [timer.measure(copy) for _ in range(reps)]
    timer.close()
    return 2 * copy.src.numel() * 4 / statistics.median(times)


def summarize(times: list[float]) -> dict:
    """Median, minimum and quartiles of ``times`` (seconds)."""
    ordered = sorted(times)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "median_s": statistics.median(ordered),
        "min_s": ordered[0],
        "q1_s": q1,
        "q3_s": q3,
        "reps": len(ordered),
    }


def _describe_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:300]


def time_interleaved(
    steps: Mapping[str, object],
    timer: Timer,
    *,
    warmup: int,
    warmup_s: float = 0.0,
    reps: int,
    min_reps: int,
    budget_s: float,
    on_loss=None,
) -> tuple[dict[str, list[float]], dict[str, str], list[str]]:
    """Warm up every step (``warmup`` runs, more until ``warmup_s`` seconds), then time them interleaved.

    Returns (times per name, error per name that failed, the order the runs happened
    in as a list of names). ``on_loss(name, loss)`` sees each implementation's loss
    from its first warm-up run, for the agreement check. A step that raises is dropped
    from the case and its error recorded; the others go on.
    """
    if not 1 <= min_reps <= reps:
        raise ValueError(f"need 1 <= min_reps <= reps, got min_reps={min_reps}, reps={reps}")
    errors: dict[str, str] = {}
    alive: list[str] = []
    for name, step in steps.items():
        try:
            started = time.perf_counter()
            for i in range(max(warmup, MAX_WARMUP_RUNS)):
                step.prepare()
                loss = step.run()
                timer.synchronize()
                if i == 0 and on_loss is not None:
                    on_loss(name, loss)
                if i + 1 >= warmup and time.perf_counter() - started >= warmup_s:
                    break
            alive.append(name)
        except Exception as error:  # one failing implementation must not end the sweep
            errors[name] = _describe_error(error)
        finally:
            step.release()  # free the gradient before the next implementation warms up
    times: dict[str, list[float]] = {name: [] for name in alive}
    order: list[str] = []
    started = time.perf_counter()
    for rep in range(reps):
        if not alive:
            break
        shift = rep % len(alive)
        for name in alive[shift:] + alive[:shift]:
            try:
                times[name].append(timer.measure(steps[name]))
                order.append(name)
            except Exception as error:
                errors[name] = _describe_error(error)
            finally:
                steps[name].release()
        for name in [n for n in alive if n in errors]:
            alive.remove(name)
            del times[name]
        if rep + 1 >= min_reps and time.perf_counter() - started > budget_s:
            break
    return times, errors, order
