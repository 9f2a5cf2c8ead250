"""Fine-tune a tiny random Llama for a few steps with transformers' Trainer, stock and with smoothce, on CPU.

The smoothce run is the stock script plus one line, ``patch(model)``. Each run is a fresh process, so
its peak memory is its own; the script prints both runs' logged losses and their peak memory during
training (peak RSS minus the RSS before ``trainer.train()``, Linux).

    python examples/transformers_trainer.py
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


class TokenData:
    """Random token rows of random lengths, padding labelled -100 (a map-style dataset)."""

    def __init__(self, rows: int, seq: int, vocab: int):
        import torch

        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(0, vocab, (rows, seq), generator=generator)
        lengths = torch.randint(seq // 2, seq + 1, (rows,), generator=generator)
        self.attention_mask = (torch.arange(seq) < lengths[:, None]).long()
        self.labels = self.input_ids.masked_fill(self.attention_mask == 0, -100)

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def train(args) -> dict:
    import tempfile

    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.seq,
    )
    model = transformers.LlamaForCausalLM(config)
    if args.run == "smoothce":
        from smoothce.integrations.transformers import patch

        patch(model)  # the one line: the LM head's loss fused, no logits in training
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = transformers.TrainingArguments(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=2,
            learning_rate=1e-3,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(
            model=model, args=training_args, train_dataset=TokenData(4 * args.batch * args.steps, args.seq, args.vocab)
        )
        baseline = _proc_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets the peak RSS to the current RSS
        trainer.train()
        peak = _proc_kib("VmHWM") - baseline
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"losses": losses, "peak_bytes": peak * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps (2 micro-batches each)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--run", choices=("stock", "smoothce"), help=argparse.SUPPRESS)  # a child process's run
    args = parser.parse_args()
    if args.run:
        print(json.dumps(train(args)))
        return
    runs = {}
    for run in ("stock", "smoothce"):
        done = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--run", run], capture_output=True, text=True, check=True
        )
        runs[run] = json.loads(done.stdout.strip().splitlines()[-1])
    logits_mib = args.batch * args.seq * args.vocab * 4 / 2**20
    print(
        f"tiny Llama, V={args.vocab}, {args.steps} steps of 2 x {args.batch} x {args.seq} tokens "
        f"(fp32 logits of one micro-batch: {logits_mib:.0f} MiB)"
    )
    print("step  stock loss  smoothce loss")
    for step, (stock, ours) in enumerate(zip(runs["stock"]["losses"], runs["smoothce"]["losses"], strict=True), 1):
        print(f"{step:4d}  {stock:10.6f}  {ours:13.6f}")
    for run, result in runs.items():
        print(f"{run:8s} peak memory during training: {result['peak_bytes'] / 2**20:7.0f} MiB")
    worst = max(abs(a - b) for a, b in zip(runs["stock"]["losses"], runs["smoothce"]["losses"], strict=True))
    if worst > 1e-4:
        sys.exit(f"losses differ by {worst:.2e} (> 1e-4)")


if __name__ == "__main__":
    main()
