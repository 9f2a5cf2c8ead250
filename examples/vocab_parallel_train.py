"""Train a tiny LM whose output layer is split over 2 CPU ranks (gloo) with smoothce's vocabulary-parallel losses.

    python examples/vocab_parallel_train.py                       # spawns 2 processes
    torchrun --nproc-per-node 2 examples/vocab_parallel_train.py  # or let torchrun start them

The lm_head is made ColwiseParallel with ``parallelize_module``; each rank holds about half of
its 1003 classes. Three runs of 5 SGD steps start from the same weights, with label smoothing 0.1:

1. one process, no parallelism: ``smoothce.cross_entropy`` of the full logits;
2. DTensor logits: ``ColwiseParallel(use_local_output=False)`` gives logits placed Shard(-1), and
   ``smoothce.cross_entropy`` takes the vocabulary-parallel loss on them;
3. fused: ``smoothce.linear_cross_entropy(hidden, lm_head.weight, ...)`` with the Shard(0)
   weight: no rank ever holds more than one chunk of its logits.

Then 1 and 2 again with a modern recipe's options (Gemma 2's logit soft-capping at 30, PaLM's
z-loss 1e-4, and class weights, which each rank takes its chunk of).

The losses of 2 and 3 must match 1 within 1e-5 at every step; otherwise the script exits non-zero.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import smoothce
import smoothce.dtensor

VOCAB, DIM, STEPS, LAM, LR, TOLERANCE = 1003, 32, 5, 0.1, 0.5, 1e-5
RECIPE = {"softcap": 30.0, "z_loss": 1e-4}


class TinyLM(nn.Module):
    """Embedding, one tanh layer, and the output layer (lm_head) whose classes get split."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.body = nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh())
        self.lm_head = nn.Linear(DIM, VOCAB)

    def hidden(self, tokens):
        return self.body(self.embed(tokens))

    def forward(self, tokens):
        return self.lm_head(self.hidden(tokens))


def batch():
    # The same batch on every rank: next-token targets, padding ignored.
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (4, 17), generator=gen)
    target = tokens[:, 1:].clone()
    target[0, -3:] = -100
    return tokens[:, :-1], target


def train(mode: str, mesh=None, recipe=None) -> list[float]:
    """Losses of STEPS SGD steps; ``mode``: "single", "dtensor" or "fused"; ``recipe``: None or
    ``RECIPE``, with class weights 1 + (class mod 3) / 2 (a plain full tensor: each rank takes its chunk)."""
    torch.manual_seed(0)
    model = TinyLM()
    options = {"label_smoothing": LAM}
    if recipe is not None:
        options.update(recipe, weight=1.0 + (torch.arange(VOCAB) % 3) / 2)
    if mode == "dtensor":
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel(use_local_output=False)})
    elif mode == "fused":
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, foreach=False)  # plain and DTensor parameters
    tokens, target = batch()
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        if mode == "fused":  # the lm_head's Shard(0) weight takes the fused vocabulary-parallel loss
            head = model.lm_head
            loss = smoothce.linear_cross_entropy(
                model.hidden(tokens), head.weight, target, bias=head.bias, label_smoothing=LAM
            )
        else:  # plain logits ("single") or Shard(-1) DTensor logits ("dtensor"): the same call
            loss = smoothce.cross_entropy(model(tokens), target, **options)
        loss.backward()
        optimizer.step()
        losses.append(float((loss.full_tensor() if mode != "single" else loss).detach()))
    return losses


def run(rank: int, world: int) -> None:
    mesh = init_device_mesh("cpu", (world,))
    runs = {mode: train(mode, mesh) for mode in ("single", "dtensor", "fused")}
    runs.update({f"{mode}, recipe": train(mode, mesh, RECIPE) for mode in ("single", "dtensor")})
    if rank == 0:
        print("step  one process   DTensor logits  fused LM head   | with the recipe: one process  DTensor")
        for step in range(STEPS):
            print(
                f"{step:>4}  {runs['single'][step]:.8f}  {runs['dtensor'][step]:.8f}      {runs['fused'][step]:.8f}"
                f"      |                   {runs['single, recipe'][step]:.8f}  {runs['dtensor, recipe'][step]:.8f}"
            )
    for mode, single in (("dtensor", "single"), ("fused", "single"), ("dtensor, recipe", "single, recipe")):
        worst = max(abs(a - b) for a, b in zip(runs[mode], runs[single], strict=True))
        if worst > TOLERANCE:
            raise SystemExit(f"rank {rank}: {mode} losses differ from one process by {worst:.3g} > {TOLERANCE}")
    if rank == 0:
        print(f"ok: the three tensor-parallel runs within {TOLERANCE} of one process")


def _spawned(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        run(rank, world)
    finally:
        dist.destroy_process_group()


def main() -> int:
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("gloo")
        try:
            run(dist.get_rank(), dist.get_world_size())
        finally:
            dist.destroy_process_group()
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(2, port), nprocs=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
