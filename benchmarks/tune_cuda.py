"""Measure the CUDA launch table's candidates and the op against PyTorch, on the GPU at hand.

    python benchmarks/tune_cuda.py --out DIR

For each dtype and target shape (forward+backward, mean, lam = 0.1, every 10th target
ignored): the copy limit (one device-to-device copy of the logits), each candidate
configuration of the loss kernel (its error against float64 on the first rows checked
first), the op with the table as committed, eager F.cross_entropy, and the no-grad forward
against the read limit (torch.amax of the logits). Times are do_bench medians (L2 flushed
between runs). Writes DIR/tuning.json and DIR/tuning.md and prints a line per case.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import smoothce
from smoothce.backends import triton_kernels
from smoothce.backends.cuda_triton import CudaTritonBackend
from smoothce.reference import cross_entropy_reference

# The target shapes, and a short row (the table's whole-row split kernel against the loop kernel).
SHAPES = [(8192, 32000), (8192, 128256), (4096, 262144), (16384, 151936), (32768, 8192)]
CANDIDATES = {
    torch.bfloat16: [
        ("split", 4096, 4),
        ("split", 8192, 8),
        ("split", 8192, 16),
        ("loop", 2048, 8),
        ("loop", 4096, 16),
        ("loop", 8192, 16),
    ],
    torch.float32: [
        ("split", 2048, 4),
        ("split", 4096, 8),
        ("loop", 1024, 4),
        ("loop", 1024, 8),
        ("loop", 2048, 8),
        ("loop", 4096, 16),
    ],
}


def bench(fn, rep):
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--rep", type=int, default=40, help="milliseconds of timed runs per case")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    backend = CudaTritonBackend()
    lam = 0.1
    records = []
    start = time.perf_counter()
    for dtype, candidates in CANDIDATES.items():
        for n_rows, num_classes in SHAPES:
            logits = torch.randn(n_rows, num_classes, device=device).mul_(3).to(dtype)
            target = torch.randint(0, num_classes, (n_rows,), device=device)
            target[::10] = -100
            out = torch.empty_like(logits)
            row = {"dtype": str(dtype).removeprefix("torch."), "rows": n_rows, "V": num_classes}
            row["copy_ms"] = bench(lambda: out.copy_(logits), args.rep)
            row["read_ms"] = bench(lambda: torch.amax(logits), args.rep)
            ref_loss, ref_grad = cross_entropy_reference(
                logits[:64].double().cpu(), target[:64].cpu(), label_smoothing=lam
            )
            one = torch.ones((), device=device)
            for kernel, block, warps in candidates:
                config = {
                    "kernel": kernel,
                    "block": block,
                    "num_warps": warps,
                    "keep": "evict_last",
                    "drop": "evict_first",
                    "fast_exp": backend.FAST_EXP,
                }
                name = f"{kernel}/{block}/{warps}"
                try:

                    def step():
                        loss, grad, factor = triton_kernels.loss_and_grad(
                            logits, target, lam, -100, "mean", True, config
                        )
                        return loss, backend.scale_grad(grad, one, factor, False, True)

                    loss, grad = triton_kernels.loss_and_grad(
                        logits[:64], target[:64], lam, -100, "mean", True, config
                    )[:2]
                    err = float((grad.double().cpu() - ref_grad).abs().max() / ref_grad.abs().max())
                    loss_err = abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))
                    row[name] = {"ms": bench(step, args.rep), "grad_err": err, "loss_err": loss_err}
                except Exception as error:  # a configuration that does not compile or run here
                    row[name] = {"error": repr(error)[:300]}
            x = logits.detach().requires_grad_()

            def ours():
                x.grad = None
                smoothce.cross_entropy(x, target, label_smoothing=lam).backward()

            def eager():
                x.grad = None
                F.cross_entropy(x, target, label_smoothing=lam).backward()

            row["table_config"] = backend.launch_config(num_classes, dtype, device)
            row["smoothce_ms"] = bench(ours, args.rep)
            row["eager_ms"] = bench(eager, args.rep)
            with torch.no_grad():
                row["smoothce_nograd_ms"] = bench(
                    lambda: smoothce.cross_entropy(logits, target, label_smoothing=lam), args.rep
                )
                row["eager_nograd_ms"] = bench(lambda: F.cross_entropy(logits, target, label_smoothing=lam), args.rep)
            row["peak_extra_over_logits"] = None
            x.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            smoothce.cross_entropy(x, target, label_smoothing=lam).backward()
            torch.cuda.synchronize()
            row["peak_extra_over_logits"] = (torch.cuda.max_memory_allocated() - base) / logits.nbytes
            records.append(row)
            best = min((k for k in row if "/" in k and "ms" in row[k]), key=lambda k: row[k]["ms"], default=None)
            print(
                f"[{time.perf_counter() - start:5.0f}s] {row['dtype']} {n_rows}x{num_classes}: copy "
                f"{row['copy_ms']:.3f} ms, op {row['smoothce_ms']:.3f} ms "
                f"({row['copy_ms'] / row['smoothce_ms']:.0%} of copy), eager {row['eager_ms']:.3f} ms, "
                f"best {best} {row[best]['ms'] if best else float('nan'):.3f} ms, no-grad "
                f"{row['read_ms'] / row['smoothce_nograd_ms']:.0%} of read",
                flush=True,
            )
            (args.out / "tuning.json").write_text(
                json.dumps(
                    {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "records": records}, indent=1
                )
            )
            del logits, out, x, target


if __name__ == "__main__":
    main()
