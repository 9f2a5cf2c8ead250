"""The README's Python snippets run as written, on CPU tensors the test prepares for them.

Each ```python block is matched to the names it expects (``SETUPS``, by a phrase in the block);
a block that matches none fails, so a new snippet comes with its setup here. The blocks that need
several ranks or a downloaded model are run in spirit by their own tests (named in ``ELSEWHERE``).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
pytestmark = pytest.mark.skipif(not README.exists(), reason="needs the source tree (README.md) beside the tests")


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if README.exists() else []


def _loss_inputs():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 10, generator=generator).requires_grad_(True)
    target = torch.randint(0, 10, (4, 7), generator=generator)
    return {"logits": logits, "target": target}


def _accumulation():
    model = torch.nn.Linear(8, 10)
    generator = torch.Generator().manual_seed(0)
    batches = iter(
        SimpleNamespace(
            input=torch.randn(5, 8, generator=generator), target=torch.randint(0, 10, (5,), generator=generator)
        )
        for _ in range(8)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return {"model": model, "batches": batches, "accumulation_steps": 4, "optimizer": optimizer}


def _linear():
    generator = torch.Generator().manual_seed(0)
    return {
        "hidden": torch.randn(6, 16, generator=generator).requires_grad_(True),
        "lm_head": torch.nn.Linear(16, 50, bias=False),
        "target": torch.randint(0, 50, (6,), generator=generator),
    }


# A phrase of the block -> the names it uses.
SETUPS = {
    "loss = smoothce.cross_entropy(logits, target": _loss_inputs,
    "normalizer=n_tokens": _accumulation,
    "smoothce.linear_cross_entropy(hidden, lm_head.weight": _linear,
}
# A phrase of the block -> the tests that run its calls (on gloo ranks, or tiny models built from configs).
ELSEWHERE = {
    "vocab_parallel_cross_entropy(": "tests/test_distributed.py",
    "from smoothce.integrations.transformers import patch": "tests/test_transformers.py",
}


def test_readme_has_snippets():
    assert len(_blocks()) >= len(SETUPS) + len(ELSEWHERE)


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_snippet_runs(index):
    block = _blocks()[index]
    elsewhere = [test for phrase, test in ELSEWHERE.items() if phrase in block]
    if elsewhere:
        assert (ROOT / elsewhere[0]).exists()
        pytest.skip(f"needs several ranks or a model download; {elsewhere[0]} runs these calls")
    setups = [setup for phrase, setup in SETUPS.items() if phrase in block]
    assert len(setups) == 1, f"README block {index} has no setup in tests/test_readme.py:\n{block}"
    import smoothce

    namespace = {"torch": torch, "smoothce": smoothce, **setups[0]()}  # later blocks follow the first's imports
    exec(compile(block, f"README.md block {index}", "exec"), namespace)
    for name, value in namespace.items():  # every loss it computed is a finite number
        if name == "loss" or name.startswith("loss"):
            assert torch.isfinite(value.detach()).all()
