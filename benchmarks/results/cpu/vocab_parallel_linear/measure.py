"""The fused vocabulary-parallel LM-head loss against the unfused one, per rank: forward + backward time, peak memory.

    python benchmarks/results/cpu/vocab_parallel_linear/measure.py [--rounds 5] [--dtypes fp32 bf16]
        [--chunk-mib 4 16 ...] [--shard-block-elements N] [--skip time|memory] [--out FILE]

2 gloo ranks on loopback, one torch thread each; hidden (N, D) on every rank, rank i holding rows W_i (V_i, D) of
the output layer; label_smoothing=0.1, "mean", every 16th target ignored (``smoothce.bench.linear.make_inputs``).

- fused: ``smoothce.vocab_parallel_linear_cross_entropy(hidden, W_i, target)`` and its backward.
- fused, bf16 d weight: the same under ``smoothce.linear.settings(fp32_weight_grad=False)`` (half dtypes only).
- unfused: logits = hidden W_i^T, ``smoothce.vocab_parallel_cross_entropy`` on them and its backward, then
  d hidden = G W_i (all-reduced) and d W_i = G^T hidden.
- with ``--chunk-mib``: the fused variants also under ``settings(chunk_bytes=...)`` at each budget ("@ 4 MiB").
- with ``--shard-block-elements``: every variant with the CPU shard functions' block size
  (``smoothce.backends.torch_defaults.SHARD_BLOCK_ELEMENTS["cpu"]``) set to N in the ranks, to try another.

Time: interleaved rounds (``smoothce.bench.measure.time_rounds``), a barrier before each run, medians per rank.
Memory: each variant in fresh rank processes, after one warm-up run: ``smoothce.bench.measure.rss_growth`` of one
run minus the parameter gradients it returns (d hidden, d W_i), as a fraction of the local logits (N x V_i). The
ranks start with glibc's MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at 64 KiB (rss_growth's thresholds), so
the warm-up leaves no freed large chunk in malloc's heap for the measured run to make resident again and keep.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import smoothce
from smoothce.backends import torch_defaults
from smoothce.bench import machine, measure
from smoothce.bench.linear import DTYPES, LABEL_SMOOTHING, make_inputs
from smoothce.bench.vocab_parallel import launch

VARIANTS = ("fused", "fused, bf16 d weight", "unfused")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 16), "MALLOC_TRIM_THRESHOLD_": str(1 << 16)}


class Step:
    """One forward + backward of a variant on this rank's inputs; ``run`` leaves hidden.grad and weight.grad."""

    def __init__(self, variant, hidden, weight, target):
        self.variant, self.target = variant, target
        self.fp32_weight_grad = "bf16 d weight" not in variant
        self.chunk_bytes = int(float(variant.split("@ ")[1].split()[0]) * 2**20) if "@" in variant else None
        self.hidden, self.weight = (t.detach().clone().requires_grad_(True) for t in (hidden, weight))

    def release(self):
        self.hidden.grad = self.weight.grad = None

    prepare = release

    def run(self):
        self.release()
        if self.variant == "unfused":
            with torch.no_grad():
                logits = (self.hidden @ self.weight.t()).requires_grad_(True)
            smoothce.vocab_parallel_cross_entropy(logits, self.target, label_smoothing=LABEL_SMOOTHING).backward()
            grad = logits.grad
            with torch.no_grad():
                d_hidden = grad @ self.weight
                dist.all_reduce(d_hidden)
                self.hidden.grad, self.weight.grad = d_hidden, grad.t() @ self.hidden
            return
        with smoothce.linear.settings(chunk_bytes=self.chunk_bytes, fp32_weight_grad=self.fp32_weight_grad):
            loss = smoothce.vocab_parallel_linear_cross_entropy(
                self.hidden, self.weight, self.target, label_smoothing=LABEL_SMOOTHING
            )
        loss.backward()

    def gradient_bytes(self):
        return sum(t.grad.numel() * t.grad.element_size() for t in (self.hidden, self.weight))


def _steps(rank, world, shape, dtype_name, variants, shard_block):
    if shard_block:
        torch_defaults.SHARD_BLOCK_ELEMENTS["cpu"] = shard_block
    n, d, v = shape
    hidden, weight, target = make_inputs(n, d, v, DTYPES[dtype_name], torch.device("cpu"))
    weight = weight.tensor_split(world)[rank].clone()
    return {name: Step(name, hidden, weight, target) for name in variants}, n * weight.shape[0]


def _timed(step) -> float:
    """Wall seconds of one run (returned) and the process's CPU seconds in it (appended to ``step.cpu``)."""
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    step.run()
    seconds = time.perf_counter() - start
    step.cpu.append(time.process_time() - cpu)
    step.release()
    return seconds


def _time_rank(rank, world, device, shape, dtype_name, variants, rounds, shard_block):
    """Per variant: wall and CPU seconds per round on this rank, and the gradients' max relative difference from
    unfused's."""
    torch.set_num_threads(1)
    steps, _ = _steps(rank, world, shape, dtype_name, variants, shard_block)
    for step in steps.values():
        step.cpu = []
    grads = {}
    for name, step in steps.items():  # untimed warm-up, and the gradients to compare
        step.run()
        grads[name] = (step.hidden.grad.float(), step.weight.grad.float())
        step.release()
    times, errors, _ = measure.time_rounds(steps, _timed, rounds)
    reference = grads["unfused"]
    differences = {
        name: [((g - r).abs().max() / r.abs().max()).item() for g, r in zip(pair, reference, strict=True)]
        for name, pair in grads.items()
    }
    cpu = {name: step.cpu for name, step in steps.items()}
    return {"seconds": times, "cpu_seconds": cpu, "errors": errors, "grad_difference": differences}


def _memory_rank(rank, world, device, shape, dtype_name, variant, shard_block):
    """Bytes one run needs beyond its inputs and returned gradients, and the local logits' bytes."""
    torch.set_num_threads(1)
    steps, logits = _steps(rank, world, shape, dtype_name, [variant], shard_block)
    step = steps[variant]
    step.run()  # warm-up: libraries, gloo's buffers
    step.release()
    extra = measure.rss_growth(step.run) - step.gradient_bytes()
    return {"peak_extra_bytes": extra, "logits_bytes": logits * DTYPES[dtype_name].itemsize}


def _variants(dtype_name, chunk_mib):
    fused = [name for name in VARIANTS[:-1] if dtype_name != "fp32" or name == "fused"]
    return fused + [f"{name} @ {mib:g} MiB" for mib in chunk_mib for name in fused] + ["unfused"]


def _vs(seconds, name) -> str:
    # The median over rounds of this variant's time / unfused's in the same round.
    return f"{statistics.median(a / b for a, b in zip(seconds[name], seconds['unfused'], strict=True)):.3f}x"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[4096, 1024, 32000], metavar=("N", "D", "V"))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--chunk-mib", type=float, nargs="+", default=[], help="also the fused loss at these budgets")
    parser.add_argument("--shard-block-elements", type=int, help="the CPU shard functions' block size")
    parser.add_argument("--skip", choices=["time", "memory"], help="measure only the other")
    parser.add_argument("--out", help="also write the record as JSON to this file")
    args = parser.parse_args(argv)
    env = machine.describe(torch.device("cpu"))
    env["torch_threads"] = 1
    env.pop("collect_env")
    load = {"start": os.getloadavg()}
    record = {"environment": env, "shape": args.shape, "world": args.world, "rounds": args.rounds, "cases": []}
    record["shard_block_elements"] = args.shard_block_elements or torch_defaults.SHARD_BLOCK_ELEMENTS["cpu"]
    lines = [
        "| dtype | variant | wall ms | wall vs unfused | CPU ms rank 0 / 1 | CPU vs unfused rank 0 / 1 "
        "| extra MiB rank 0 / 1 | x local logits rank 0 / 1 | grad diff (h, W) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    block = args.shard_block_elements
    for dtype_name in args.dtypes:
        variants, case = _variants(dtype_name, args.chunk_mib), {"dtype": dtype_name}
        if args.skip != "time":
            ranks = launch(_time_rank, args.world, args.shape, dtype_name, variants, args.rounds, block)
            case["timing"], load[f"after {dtype_name} time"] = ranks, os.getloadavg()
        if args.skip != "memory":
            os.environ.update(MALLOC_ENV)  # read by glibc as each spawned rank starts
            case["memory"] = {v: launch(_memory_rank, args.world, args.shape, dtype_name, v, block) for v in variants}
            for name in MALLOC_ENV:  # (timed ranks run with glibc's defaults)
                del os.environ[name]
            load[f"after {dtype_name} memory"] = os.getloadavg()
        record["cases"].append(case)
        for name in variants:
            cells = [dtype_name, name]
            if "timing" in case:
                rank0 = case["timing"][0]
                cells += [f"{statistics.median(rank0['seconds'][name]) * 1e3:.0f}", _vs(rank0["seconds"], name)]
                cpu = [r["cpu_seconds"] for r in case["timing"][:2]]
                cells += [" / ".join(f"{statistics.median(c[name]) * 1e3:.0f}" for c in cpu)]
                cells += [" / ".join(_vs(c, name) for c in cpu)]
                diff = rank0["grad_difference"][name]
            else:
                cells += ["", "", "", ""]
            if "memory" in case:
                mem = case["memory"][name]
                cells += [" / ".join(f"{r['peak_extra_bytes'] / 2**20:.1f}" for r in mem[:2])]
                cells += [" / ".join(f"{r['peak_extra_bytes'] / r['logits_bytes']:.1%}" for r in mem[:2])]
            else:
                cells += ["", ""]
            cells += [f"{diff[0]:.1e}, {diff[1]:.1e}" if "timing" in case else ""]
            lines.append("| " + " | ".join(cells) + " |")
    load["end"] = os.getloadavg()
    record["load_average"] = load
    n, d, v = args.shape
    text = (
        f"{n} x {d} -> {v}, {args.world} gloo ranks (V_i = {v // args.world}), 1 thread each, label_smoothing="
        f"{LABEL_SMOOTHING}, mean, every 16th target ignored; shard block {record['shard_block_elements']} "
        f"elements; {args.rounds} interleaved rounds (wall: rank 0, "
        "medians; vs unfused: median of the rounds' ratios; CPU: the rank's process time). "
        f"{machine.text(env)} Load average (1, 5, 15 min) at each stage: "
        + "; ".join(f"{k}: {', '.join(f'{x:.2f}' for x in value)}" for k, value in load.items())
        + "\n\n"
        + "\n".join(lines)
    )
    print(text)
    if args.out:
        with open(args.out, "w") as out:
            json.dump(record, out, indent=1)
    return record


if __name__ == "__main__":
    main()
