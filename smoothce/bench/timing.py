"""Timing: one measurement per implementation per round, rounds interleaved, medians over rounds.

Accelerators: ``triton.testing.do_bench``, as the peers (Liger, quack, the Triton tutorials)
publish their numbers; a round's number is its median over ``rep_ms`` of runs (``Timer.measure``).
Liger, which writes its gradient into the logits, is not restored between these runs: its later
runs read its own gradient in place of the logits, the same work.

CPU: ``time.perf_counter`` around each run, runs repeated for ``rep_ms``, median. Not
``torch.utils.benchmark.Timer``: it times blocks of back-to-back calls with nothing untimed in
between, so dropping the previous gradient would be timed too, or gradients would accumulate.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch


def describe_error(error: BaseException) -> str:
    """"Type: first line of the message", at most 300 characters, for tables and JSON."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"[:300]


class Timer:
    """Seconds per run of a ``Step`` (prepare / run / release) on ``device``."""

    def __init__(self, device: torch.device, warmup_ms: float = 25.0, rep_ms: float = 100.0):
        self.device, self.warmup_ms, self.rep_ms = torch.device(device), warmup_ms, rep_ms
        self.module = None if self.device.type == "cpu" else getattr(torch, self.device.type)

    def measure(self, step) -> float:
        """The median seconds of one round of ``step``'s runs. do_bench: runs back to back, each between two
        device events, the L2 flushed and the previous gradient dropped before each (outside the events)."""
        if self.module is None:
            times, started = [], time.perf_counter()
            while not times or time.perf_counter() - started < self.rep_ms / 1e3:
                step.prepare()
                start = time.perf_counter()
                step.run()
                times.append(time.perf_counter() - start)
            step.release()
            return statistics.median(times)
        from triton.testing import do_bench

        step.prepare()
        leaf = getattr(step, "logits", None)
        grad_to_none = [leaf] if leaf is not None and leaf.requires_grad else None
        with self.module.device(self.device):
            ms = do_bench(step.run, warmup=self.warmup_ms, rep=self.rep_ms, grad_to_none=grad_to_none,
                          return_mode="median")  # fmt: skip
        step.release()
        return ms / 1e3


class Limit:
    """A ``Step``-like run of the least work a case needs: a copy of the logits, or a read of them.

    copy: ``out.copy_(logits)``, reads the logits once and writes a gradient-sized buffer
    once, the least traffic of any forward+backward. read: ``torch.amax(logits)``, one
    reduction that reads every logit once and writes one number, the least of a forward.
    """

    def __init__(self, logits: torch.Tensor, kind: str):
        if kind not in ("copy", "read"):
            raise ValueError(f"limit kind must be 'copy' or 'read', got {kind!r}")
        self.kind, self.logits = kind, logits
        self.out = torch.zeros_like(logits) if kind == "copy" else None  # written once: pages resident

    def run(self):
        return self.out.copy_(self.logits) if self.kind == "copy" else torch.amax(self.logits)

    prepare = release = lambda self: None  # nothing to reset


def summarize(times: list[float]) -> dict:
    """Median, minimum and quartiles of ``times`` (seconds), and how many there are."""
    ordered = sorted(times)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return {"median_s": statistics.median(ordered), "min_s": ordered[0], "q1_s": q1, "q3_s": q3, "reps": len(ordered)}


def time_rounds(steps: Mapping[str, object], measure: Callable[[object], float], rounds: int):
    """``rounds`` rounds of ``measure(step)`` for every step, the start rotating by one each round, so slow
    drifts of the machine (clocks, other processes) fall on all alike.

    Returns (seconds per round per name, error per name that failed, the order of the
    measurements). A step that raises is dropped and its error recorded; the others go on.
    """
    alive, errors, order = list(steps), {}, []
    times: dict[str, list[float]] = {name: [] for name in alive}
    for r in range(rounds):
        shift = r % max(1, len(alive))
        for name in alive[shift:] + alive[:shift]:
            try:
                times[name].append(measure(steps[name]))
                order.append(name)
            except Exception as error:  # one failing implementation must not end the sweep
                errors[name] = describe_error(error)
        alive = [name for name in alive if name not in errors]
    return {name: times[name] for name in alive}, errors, order
