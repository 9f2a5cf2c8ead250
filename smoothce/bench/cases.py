"""What one benchmark case is (N tokens, V classes, dtype, mode, λ), its inputs and its float64 loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smoothce.bench.impls import FWD_BWD

DTYPES, IGNORE_INDEX = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}, -100
# Vocabulary sizes of real models: Llama-2 / Mistral, GPT-2, Llama-3, Qwen2, Gemma-3.
VOCAB_SIZES = (32000, 50257, 128256, 151936, 262144)
# The least traffic any implementation needs (b: bytes per logit): the yardstick for every bandwidth and limit.
BYTES_MODEL = {"fwd": "N·V·b (read the logits once)", FWD_BWD: "2·N·V·b (read the logits, write the gradient)"}


@dataclass(frozen=True)
class Case:
    n: int  # tokens (rows of logits)
    v: int  # vocabulary size (classes)
    dtype: str  # a key of DTYPES
    mode: str  # "fwd" or "fwd+bwd"
    label_smoothing: float = 0.1
    impls: tuple[str, ...] | None = None  # only these of the run's implementations (None: all)

    @property
    def logits_bytes(self) -> int:
        return self.n * self.v * DTYPES[self.dtype].itemsize

    @property
    def bytes_moved(self) -> int:
        """The least traffic of BYTES_MODEL."""
        return self.logits_bytes * (2 if self.mode == FWD_BWD else 1)


def grid(shapes, dtypes, modes, label_smoothing: float = 0.1) -> list[Case]:
    """Every (shape, dtype, mode), shape by shape, so each shape's logits are made once per dtype."""
    return [Case(n, v, d, m, label_smoothing) for n, v in shapes for d in dtypes for m in modes]


def make_inputs(n: int, v: int, dtype: str, device: torch.device, seed: int, ignore_every: int = 0):
    """Logits ~ N(0, 1) of shape (N, V) and int64 targets uniform in [0, V), from ``seed``; with
    ``ignore_every = k > 0`` every k-th target (rows k-1, 2k-1, ...) is IGNORE_INDEX."""
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, v, generator=generator, device=device, dtype=DTYPES[dtype])
    target = torch.randint(0, v, (n,), generator=generator, device=device, dtype=torch.int64)
    if ignore_every > 0:
        target[ignore_every - 1 :: ignore_every] = IGNORE_INDEX
    return logits, target


def reference_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> float:
    """The mean loss over counted rows, in float64, a few rows at a time so it needs little memory."""
    rows, total = max(1, (1 << 22) // logits.shape[1]), 0.0
    for start in range(0, logits.shape[0], rows):
        chunk, chunk_target = logits[start : start + rows].double(), target[start : start + rows]
        total += float(F.cross_entropy(chunk, chunk_target, label_smoothing=label_smoothing, reduction="sum"))
    counted = int((target != IGNORE_INDEX).sum())
    return total / counted if counted else float("nan")
