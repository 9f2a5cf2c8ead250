"""What one benchmark case is: a shape (N tokens, V classes), a dtype and a mode, and its inputs.

Also the parsing of the command line's lists (``--shapes 2048x32000,512x128256``,
``--dtypes fp32,bf16``, ``--modes fwd+bwd,fwd``) and the bytes-moved model used for
the effective bandwidth:

    fwd:      N * V * b      (read the logits once)
    fwd+bwd:  2 * N * V * b  (read the logits once, write the gradient once)

with b the bytes per logit. These are the least traffic any implementation needs,
so the effective bandwidth is the same yardstick for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smoothce.bench.impls import FWD, FWD_BWD, MODES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Vocabulary sizes of real models: Llama-2 / Mistral, GPT-2, Llama-3, Qwen2, Gemma-3.
VOCAB_SIZES = (32000, 50257, 128256, 151936, 262144)


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    n: int  # tokens (rows of logits)
    v: int  # vocabulary size (classes)
    dtype: str  # a key of DTYPES
    mode: str  # "fwd" or "fwd+bwd"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def logits_bytes(self) -> int:
        return self.n * self.v * self.torch_dtype.itemsize

    @property
    def bytes_moved(self) -> int:
        """The bandwidth model of the module docstring."""
        return self.logits_bytes * (2 if self.mode == FWD_BWD else 1)

    @property
    def label(self) -> str:
        return f"{self.n}x{self.v} {self.dtype} {self.mode}"


BYTES_MODEL = {
    FWD: "N·V·b (read the logits once)",
    FWD_BWD: "2·N·V·b (read the logits once, write the gradient once)",
}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"2048x32000,512x128256"`` -> [(2048, 32000), (512, 128256)]."""
    shapes = []
    for item in text.split(","):
        item = item.strip()
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"shape {item!r} is not of the form NxV (tokens x vocabulary), e.g. 2048x32000")
        n, v = (int(p) for p in parts)
        if n < 1 or v < 1:
            raise ValueError(f"shape {item!r} needs at least one token and one class")
        shapes.append((n, v))
    return shapes


def parse_ints(text: str, what: str) -> list[int]:
    """``"256,1024"`` -> [256, 1024]; ValueError naming ``what`` and the bad item."""
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"{what} must be positive integers separated by commas, got {item!r}")
        values.append(int(item))
    return values


def parse_choices(text: str, choices, what: str) -> list[str]:
    """``"fp32,bf16"`` -> ["fp32", "bf16"], each checked against ``choices``."""
    values = []
    for item in text.split(","):
        item = item.strip()
        if item not in choices:
            raise ValueError(f"unknown {what} {item!r}: choose from {', '.join(choices)}")
        if item not in values:
            values.append(item)
    return values


def parse_modes(text: str) -> list[str]:
    return parse_choices(text, MODES, "mode")


def parse_dtypes(text: str) -> list[str]:
    return parse_choices(text, DTYPES, "dtype")


def make_inputs(n: int, v: int, dtype: str, device: torch.device, seed: int):
    """Logits ~ N(0, 1) of shape (N, V) and int64 targets uniform in [0, V), from ``seed``.

    No row is ignored. The logits are written here, so their pages are resident.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, v, generator=generator, device=device, dtype=DTYPES[dtype])
    target = torch.randint(0, v, (n,), generator=generator, device=device, dtype=torch.int64)
    return logits, target


def reference_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> float:
    """The mean loss in float64, a few rows at a time so it needs little memory."""
    total = 0.0
    rows = max(1, (1 << 22) // logits.shape[1])
    with torch.no_grad():
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start : start + rows].double()
            total += float(
                torch.nn.functional.cross_entropy(
                    chunk, target[start : start + rows], label_smoothing=label_smoothing, reduction="sum"
                )
            )
    return total / logits.shape[0]
