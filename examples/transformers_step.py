"""One training step (forward + backward) of a random Llama, stock vs smoothce-patched, each in a fresh process.

Prints the step's extra peak memory (peak RSS during the step minus the RSS before it, on Linux) in
units of the fp32 logits' size, and the median step time, wall and CPU (the process's own, steadier
than wall time on a shared machine). The sizes default to the transformers issue's
memory target: V = 128256, batch 2 x 1024 tokens, a small hidden size.

    python examples/transformers_step.py                    # stock, fused_linear=True, fused_linear=False
    python examples/transformers_step.py --json out.json    # also write the numbers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

VARIANTS = ("stock", "fused", "unfused")


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


def run_variant(args) -> dict:
    """In this process: build the model, warm up, then time ``args.reps`` steps and take their peak RSS."""
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).train()
    if args.variant != "stock":
        from smoothce.integrations.transformers import patch

        patch(model, label_smoothing=args.label_smoothing, z_loss=args.z_loss, fused_linear=args.variant == "fused")
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq))

    def step():
        output = model(input_ids=input_ids, labels=input_ids)
        output.loss.backward()
        loss = output.loss.item()
        del output
        model.zero_grad(set_to_none=True)
        return loss

    if args.reps:
        step()  # warm-up: first-call allocations and lazy initialisation
    baseline = _proc_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    times, cpu_times = [], []
    for _ in range(max(args.reps, 1)):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "variant": args.variant,
        "loss": loss,
        "step_s": statistics.median(times),
        "times_s": times,
        "step_cpu_s": statistics.median(cpu_times),
        "cpu_times_s": cpu_times,
        "extra_peak_bytes": (_proc_kib("VmHWM") - baseline) * 1024,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument(
        "--reps", type=int, default=3, help="timed steps per process, after one warm-up step (0: one step, no warm-up)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per variant, interleaved")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--z-loss", type=float, default=0.0, help="smoothce's z-loss weight (the stock run has none)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process's own
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return {}

    import torch
    import transformers

    logits_bytes = args.batch * args.seq * args.vocab * 4
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "shape": {
            "vocab": args.vocab,
            "hidden": args.hidden,
            "layers": args.layers,
            "batch": args.batch,
            "seq": args.seq,
            "label_smoothing": args.label_smoothing,
            "z_loss": args.z_loss,
        },
        "fp32_logits_bytes": logits_bytes,
        "runs": {},
    }
    child_argv = list(argv if argv is not None else sys.argv[1:])
    rounds = {}  # each round runs every variant once, interleaved, so a busy machine's load hits them alike
    for _ in range(args.rounds):
        for variant in args.variants.split(","):
            done = subprocess.run(
                [sys.executable, __file__, *child_argv, "--variant", variant],
                capture_output=True,
                text=True,
                check=True,
            )
            rounds.setdefault(variant, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    for variant, runs in rounds.items():
        run = dict(runs[0], rounds=runs)
        for key in ("step_s", "step_cpu_s", "extra_peak_bytes"):
            run[key] = statistics.median(r[key] for r in runs)
        results["runs"][variant] = run
    stock = results["runs"].get("stock")
    print(
        f"V={args.vocab} D={args.hidden} layers={args.layers} tokens={args.batch}x{args.seq}, "
        f"fp32 logits {logits_bytes / 2**30:.2f} GiB, {args.threads} threads, "
        f"medians of {max(args.reps, 1)} steps x {args.rounds} processes"
    )
    for variant, run in results["runs"].items():
        extra = run["extra_peak_bytes"]
        line = (
            f"  {variant:8s} loss {run['loss']:.6f}  step {run['step_s']:.3f} s (CPU {run['step_cpu_s']:.3f} s)  "
            f"extra peak {extra / 2**30:.2f} GiB = {extra / logits_bytes:.2f}x logits"
        )
        if stock is not None and variant != "stock":
            saved = (stock["extra_peak_bytes"] - extra) / logits_bytes
            line += (
                f"  vs stock: {saved:.2f}x logits less, time {run['step_s'] / stock['step_s']:.2f}x "
                f"(CPU {run['step_cpu_s'] / stock['step_cpu_s']:.2f}x)"
            )
        print(line)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return results


if __name__ == "__main__":
    main()
