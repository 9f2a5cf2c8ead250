"""One benchmark case (N tokens, V classes, dtype, mode, λ, the loss's options), its inputs and its float64 loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smoothce.bench.impls import FWD_BWD, composed_loss

DTYPES, IGNORE_INDEX = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}, -100
# Vocabulary sizes of real models: Llama-2 / Mistral, GPT-2, Llama-3, Qwen2, Gemma-3.
VOCAB_SIZES = (32000, 50257, 128256, 151936, 262144)
# The least traffic any implementation needs (b: bytes per logit): the yardstick for every bandwidth and limit.
BYTES_MODEL = {"fwd": "N·V·b (read the logits once)", FWD_BWD: "2·N·V·b (read the logits, write the gradient)"}
CLASS_WEIGHTS = "uniform in [0.5, 1.5) from the seed, rounded to bfloat16 (so the same in every dtype)"


@dataclass(frozen=True)
class Case:
    n: int  # tokens (rows of logits)
    v: int  # vocabulary size (classes)
    dtype: str  # a key of DTYPES
    mode: str  # "fwd" or "fwd+bwd"
    label_smoothing: float = 0.1
    impls: tuple[str, ...] | None = None  # only these of the run's implementations (None: all)
    softcap: float | None = None  # c: the loss of c·tanh(z / c)
    z_loss: float = 0.0  # s: plus s·lse² per counted row
    class_weights: bool = False  # CLASS_WEIGHTS

    @property
    def logits_bytes(self) -> int:
        return self.n * self.v * DTYPES[self.dtype].itemsize

    @property
    def bytes_moved(self) -> int:  # BYTES_MODEL
        return self.logits_bytes * (2 if self.mode == FWD_BWD else 1)

    def options(self, weight=None) -> dict:
        """The options this case turns on, as keywords of ``smoothce.cross_entropy`` (``weight``: the class weights)."""
        on = {"softcap": self.softcap, "z_loss": self.z_loss or None, "weight": weight if self.class_weights else None}
        return {name: value for name, value in on.items() if value is not None}

    @property
    def option_names(self) -> list[str]:
        """The names (of ``impls.OPTIONS``) of the options on, label smoothing included."""
        names = ["label_smoothing"] * (self.label_smoothing != 0) + [*self.options(weight=True)]
        return names + ["weighted z_loss"] * (self.class_weights and self.z_loss != 0)


def grid(shapes, dtypes, modes, label_smoothing: float = 0.1) -> list[Case]:
    """Every (shape, dtype, mode), shape by shape, so each shape's logits are made once per dtype."""
    return [Case(n, v, d, m, label_smoothing) for n, v in shapes for d in dtypes for m in modes]


def make_inputs(n: int, v: int, dtype: str, device: torch.device, seed: int, ignore_every: int = 0):
    """Logits (N, V) ~ N(0, 1) and int64 targets uniform in [0, V) from ``seed``, every k-th IGNORE_INDEX (k > 0)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, v, generator=generator, device=device, dtype=DTYPES[dtype])
    target = torch.randint(0, v, (n,), generator=generator, device=device, dtype=torch.int64)
    if ignore_every > 0:
        target[ignore_every - 1 :: ignore_every] = IGNORE_INDEX
    return logits, target


def class_weights(v: int, dtype: str, device: torch.device, seed: int) -> torch.Tensor:
    """CLASS_WEIGHTS: (V,) in ``dtype`` on ``device``."""
    weight = torch.rand(v, generator=torch.Generator().manual_seed(seed)) + 0.5
    return weight.to(torch.bfloat16).to(device, DTYPES[dtype])


def reference_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float, **options) -> float:
    """The mean loss (``impls.composed_loss`` with ``options``) in float64, a few rows at a time (little memory)."""
    rows, total, denominator = max(1, (1 << 22) // logits.shape[1]), 0.0, 0.0
    if options.get("weight") is not None:
        options["weight"] = options["weight"].double()
    for start in range(0, logits.shape[0], rows):
        chunk, chunk_target = logits[start : start + rows].double(), target[start : start + rows]
        loss, weights = composed_loss(chunk, chunk_target, label_smoothing=label_smoothing, sum_=True, **options)
        total, denominator = total + float(loss), denominator + float(weights)
    return total / denominator if denominator else float("nan")
