"""transformers integration: patch() on tiny random models against the stock model and loss, Trainer, memory.

Every model is built from its config with random weights (no download). The reference is the
unpatched model with transformers' own causal LM loss (for label smoothing, the same loss with
``F.cross_entropy(..., label_smoothing=λ)``).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import smoothce

if os.environ.get("SMOOTHCE_REQUIRE_TRANSFORMERS"):
    import transformers  # the nox session installs it: a failed import fails the run, never skips it
else:
    transformers = pytest.importorskip("transformers", reason="needs pip install 'smoothce[transformers]'")

from smoothce.integrations.transformers import patch, unpatch

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256
BATCH, SEQ = 2, 12

_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# One of each family the issue names. Gemma 2 soft-caps its logits (final_logit_softcapping) and ties
# its head to the embeddings; GPT-2 ties too (dropout off, so training mode is deterministic).
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_DECODER),
    "qwen2": lambda: transformers.Qwen2Config(**_DECODER),
    "mistral": lambda: transformers.MistralConfig(**_DECODER),
    "gemma2": lambda: transformers.Gemma2Config(**_DECODER, head_dim=8, final_logit_softcapping=30.0),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
}
# (architecture, fused_linear): every one both ways (Gemma 2 fused: the loss soft-caps the logits itself).
CASES = [(arch, fused) for arch in CONFIGS for fused in (True, False)]


def build(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]()).train()


def batch(seed: int = 0, ignore_all: bool = False) -> dict:
    """Token ids, an attention mask with padding at the end of row 1, labels -100 on padding and a few more."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    attention_mask[1, -3:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, 2] = -100
    if ignore_all:
        labels.fill_(-100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def smoothed_stock_loss(label_smoothing: float, z_loss: float = 0.0):
    """transformers' ForCausalLMLoss with F.cross_entropy's label smoothing: the reference for λ > 0; with
    ``z_loss`` s, composed by hand: s logsumexp(logits)^2 added to each counted target's loss first."""

    def loss_function(
        logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs
    ):
        logits = logits.float().view(-1, vocab_size)
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        target = shift_labels.reshape(-1)
        rows = F.cross_entropy(
            logits, target, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
        )
        if z_loss:
            rows = rows + torch.where(target != ignore_index, z_loss * torch.logsumexp(logits, -1) ** 2, 0.0)
        if num_items_in_batch is None:
            return rows.sum() / (target != ignore_index).sum()
        return rows.sum() / num_items_in_batch

    return loss_function


def stock_copy(model: nn.Module, label_smoothing: float, z_loss: float = 0.0) -> nn.Module:
    reference = copy.deepcopy(model)
    if label_smoothing or z_loss:
        reference.loss_function = smoothed_stock_loss(label_smoothing, z_loss)
    return reference


def loss_and_grads(model, inputs, autocast_dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        output = model(**inputs)
    output.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return output, grads


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 where both are 0): gradients compared as whole tensors."""
    scale = b.double().norm().item()
    difference = (a.double() - b.double()).norm().item()
    return difference / scale if scale else difference


def assert_parity(patched_output, patched_grads, stock_output, stock_grads, rtol):
    assert relative(patched_output.loss.detach(), stock_output.loss.detach()) <= rtol, (
        patched_output.loss,
        stock_output.loss,
    )
    assert patched_grads.keys() == stock_grads.keys()
    worst = max(patched_grads, key=lambda name: relative(patched_grads[name], stock_grads[name]))
    assert relative(patched_grads[worst], stock_grads[worst]) <= rtol, (
        worst,
        relative(patched_grads[worst], stock_grads[worst]),
    )


# ---------------------------------------------------------------------------------------
# Parity with the stock model and loss
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize(("arch", "fused"), CASES)
def test_parity_fp32(arch, fused, label_smoothing):
    model = build(arch)
    reference = stock_copy(model, label_smoothing)
    patch(model, label_smoothing=label_smoothing, fused_linear=fused)
    inputs = batch()
    output, grads = loss_and_grads(model, inputs)
    stock_output, stock_grads = loss_and_grads(reference, inputs)
    assert_parity(output, grads, stock_output, stock_grads, rtol=1e-5)
    if fused:
        assert output.logits is None
    else:
        torch.testing.assert_close(output.logits, stock_output.logits, rtol=0, atol=0)


@pytest.mark.parametrize(("arch", "fused"), CASES)
def test_parity_bf16_autocast(arch, fused, monkeypatch):
    """Under bf16 autocast each gradient is as far from the fp32 one as PyTorch's own bf16 run is (within 2x)."""
    label_smoothing = 0.1
    model = build(arch)
    with torch.no_grad():  # logits of a few units, as in a trained model, where bf16's rounding shows
        model.get_output_embeddings().weight.mul_(50.0)
    reference = stock_copy(model, label_smoothing)
    patch(model, label_smoothing=label_smoothing, fused_linear=fused)
    inputs = batch()
    seen = []  # the dtypes the loss ops get: autocast's bf16, as F.linear under autocast would
    for name in ("cross_entropy", "linear_cross_entropy"):
        original = getattr(smoothce, name)
        spy = lambda *a, _f=original, **k: seen.append({t.dtype for t in a[:2] if t.is_floating_point()}) or _f(*a, **k)
        monkeypatch.setattr(smoothce, name, spy)
    exact_output, exact_grads = loss_and_grads(reference, inputs)
    stock_output, stock_grads = loss_and_grads(reference, inputs, autocast_dtype=torch.bfloat16)
    output, grads = loss_and_grads(model, inputs, autocast_dtype=torch.bfloat16)
    assert output.loss.dtype == torch.float32
    spread = relative(stock_output.loss.detach(), exact_output.loss.detach())
    assert relative(output.loss.detach(), exact_output.loss.detach()) <= 2 * spread + 1e-6
    for name in grads:
        spread = relative(stock_grads[name], exact_grads[name])
        assert relative(grads[name], exact_grads[name]) <= 2 * spread + 1e-6, (name, spread)
    assert seen == [{torch.bfloat16}]


@pytest.mark.parametrize("fused", [True, False])
def test_parity_head_with_bias(fused):
    model = build("llama")
    torch.manual_seed(1)
    model.lm_head = nn.Linear(model.config.hidden_size, VOCAB, bias=True)
    reference = stock_copy(model, 0.1)
    patch(model, label_smoothing=0.1, fused_linear=fused)
    output, grads = loss_and_grads(model, batch())
    assert_parity(output, grads, *loss_and_grads(reference, batch()), rtol=1e-5)
    assert grads["lm_head.bias"].abs().max() > 0


@pytest.mark.parametrize("num_items", [None, 37])
@pytest.mark.parametrize(("arch", "fused"), [("llama", True), ("llama", False), ("gemma2", True), ("gemma2", False)])
def test_parity_z_loss(arch, fused, num_items):
    """z_loss: the stock loss plus s logsumexp(logits)^2 per counted target, composed by hand (Gemma 2: of
    the capped logits), as the mean over the targets or the sum over num_items_in_batch."""
    model = build(arch)
    reference, without = stock_copy(model, 0.1, z_loss=1e-2), stock_copy(model, 0.1)
    patch(model, label_smoothing=0.1, z_loss=1e-2, fused_linear=fused)
    inputs = batch() if num_items is None else {**batch(), "num_items_in_batch": num_items}
    output, grads = loss_and_grads(model, inputs)
    assert_parity(output, grads, *loss_and_grads(reference, inputs), rtol=1e-5)
    assert output.loss.item() - without(**inputs).loss.item() > 0.1  # the z-loss is there: ~0.01 x 5.5^2 a token


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("num_items", [37, "tensor"])
def test_num_items_in_batch(fused, num_items):
    """The summed loss divided by num_items_in_batch (what Trainer passes under gradient accumulation)."""
    num_items = torch.tensor(37) if num_items == "tensor" else num_items
    model = build("llama")
    reference = stock_copy(model, 0.1)
    patch(model, label_smoothing=0.1, fused_linear=fused)
    inputs = {**batch(), "num_items_in_batch": num_items}
    output, grads = loss_and_grads(model, inputs)
    assert_parity(output, grads, *loss_and_grads(reference, inputs), rtol=1e-5)
    summed = output.loss.item() * 37
    mean = loss_and_grads(model, batch())[0].loss.item() * int((batch()["labels"][:, 1:] != -100).sum())
    assert summed == pytest.approx(mean, rel=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_shift_labels(fused):
    """shift_labels, when given, are the targets as they are (no shift), labels unused."""
    model = build("qwen2")
    reference = stock_copy(model, 0.0)
    patch(model, fused_linear=fused)
    inputs = batch()
    generator = torch.Generator().manual_seed(5)
    shift_labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    shift_labels[1, :4] = -100
    inputs["shift_labels"] = shift_labels
    output, grads = loss_and_grads(model, inputs)
    stock_output, stock_grads = loss_and_grads(reference, inputs)
    assert_parity(output, grads, stock_output, stock_grads, rtol=1e-5)
    unshifted = loss_and_grads(model, batch())[0]
    assert abs(output.loss.item() - unshifted.loss.item()) > 1e-3


@pytest.mark.parametrize("fused", [True, False])
def test_logits_to_keep(fused):
    """logits_to_keep=K keeps the last K positions; with K shift_labels, the stock loss over those positions."""
    model = build("mistral")
    reference = stock_copy(model, 0.1)
    patch(model, label_smoothing=0.1, fused_linear=fused)
    inputs = {**batch(), "logits_to_keep": 5, "shift_labels": batch()["labels"][:, -5:]}
    output, grads = loss_and_grads(model, inputs)
    assert_parity(output, grads, *loss_and_grads(reference, inputs), rtol=1e-5)
    with pytest.raises((ValueError, RuntimeError), match=r"5|10"):
        model(**{**batch(), "logits_to_keep": 5})


@pytest.mark.parametrize("fused", [True, False])
def test_all_ignored(fused):
    """No target: with num_items_in_batch the stock loss's 0 and zero gradients; without, 0 where stock gives NaN."""
    model = build("gpt2")
    reference = stock_copy(model, 0.1)
    patch(model, label_smoothing=0.1, fused_linear=fused)
    inputs = {**batch(ignore_all=True), "num_items_in_batch": torch.tensor(16)}
    output, grads = loss_and_grads(model, inputs)
    stock_output, stock_grads = loss_and_grads(reference, inputs)
    assert output.loss.item() == 0.0 == stock_output.loss.item()
    assert all(torch.equal(grads[name], stock_grads[name]) for name in grads)
    assert all(not g.any() for g in grads.values())
    output, grads = loss_and_grads(model, batch(ignore_all=True))
    assert output.loss.item() == 0.0
    assert all(not g.any() for g in grads.values())
    assert torch.isnan(reference(**batch(ignore_all=True)).loss)


# ---------------------------------------------------------------------------------------
# Untouched outside training with labels; unpatch; patch twice
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_eval_and_generate_untouched(arch):
    model = build(arch)
    reference = copy.deepcopy(model)
    patch(model, label_smoothing=0.1)
    inputs = batch()
    no_labels = {key: inputs[key] for key in ("input_ids", "attention_mask")}
    # training mode without labels: the stock forward
    torch.testing.assert_close(model(**no_labels).logits, reference(**no_labels).logits, rtol=0, atol=0)
    model.eval()
    reference.eval()
    with torch.no_grad():
        output, stock_output = model(**inputs), reference(**inputs)
        torch.testing.assert_close(output.logits, stock_output.logits, rtol=0, atol=0)
        # eval loss: the same λ as training, through smoothce.cross_entropy
        expected = smoothed_stock_loss(0.1)(stock_output.logits, inputs["labels"], VOCAB)
        assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)
        prompt = inputs["input_ids"][:1, :4]
        generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(generated, reference.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))


def test_tuple_output_without_logits():
    model = patch(build("llama"))
    output = model(**batch(), return_dict=False)
    assert isinstance(output, tuple)
    assert output[0].dim() == 0
    assert all(not (torch.is_tensor(value) and value.shape[-1:] == (VOCAB,)) for value in output)


@pytest.mark.parametrize("fused", [True, False])
def test_unpatch_restores_stock(fused):
    model = build("llama")
    reference = copy.deepcopy(model)
    stock_loss = model.loss_function
    patch(model, label_smoothing=0.1, fused_linear=fused)
    assert unpatch(model) is model
    assert "forward" not in model.__dict__
    assert model.loss_function is stock_loss
    output, stock_output = model(**batch()), reference(**batch())
    torch.testing.assert_close(output.loss, stock_output.loss, rtol=0, atol=0)
    torch.testing.assert_close(output.logits, stock_output.logits, rtol=0, atol=0)
    assert unpatch(model) is model  # harmless when not patched


def test_patch_twice():
    model = build("llama")
    reference = stock_copy(model, 0.1)
    assert patch(patch(model, label_smoothing=0.1), label_smoothing=0.1) is model
    assert_parity(*loss_and_grads(model, batch()), *loss_and_grads(reference, batch()), rtol=1e-5)
    patch(model, label_smoothing=0.0, fused_linear=False)  # new options take effect
    output = model(**batch())
    assert output.logits is not None
    assert output.loss.item() == pytest.approx(stock_copy(model, 0.0)(**batch()).loss.item(), rel=1e-5)
    unpatch(model)  # one unpatch undoes both
    assert "forward" not in model.__dict__
    assert "_loss_function" not in model.__dict__


def test_gradient_checkpointing_and_deepcopy():
    """Trainer's gradient checkpointing, and TRL's deepcopy'd reference model: each copy its own patch."""
    model = build("llama")
    reference = stock_copy(model, 0.1)
    patch(model, label_smoothing=0.1)
    for m in (model, reference):  # the name since transformers 5.x, and the older one
        if hasattr(m, "activation_checkpointing_enable"):
            m.activation_checkpointing_enable()
            assert m.is_activation_checkpointing
        else:
            m.gradient_checkpointing_enable()
            assert m.is_gradient_checkpointing
    assert_parity(*loss_and_grads(model, batch()), *loss_and_grads(reference, batch()), rtol=1e-5)
    clone = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    output, grads = loss_and_grads(clone, batch())
    assert output.logits is None
    assert all(p.grad is None for p in model.parameters())  # the copy's forward runs on the copy
    assert_parity(output, grads, *loss_and_grads(reference, batch()), rtol=1e-5)
    unpatch(clone)
    assert model(**batch()).logits is None  # the original keeps its patch


# ---------------------------------------------------------------------------------------
# Models and options it cannot handle
# ---------------------------------------------------------------------------------------


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_unsupported_models():
    with pytest.raises(TypeError, match="transformers model"):
        patch(nn.Linear(4, 4))
    base = transformers.LlamaModel(CONFIGS["llama"]())
    with pytest.raises(ValueError, match="no output layer"):
        patch(base)
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
        )
    )
    with pytest.raises(ValueError, match="ForCausalLMLoss"):
        patch(bert)
    scaled = build("llama")
    scaled.lm_head = ScaledLinear(32, VOCAB, bias=False)
    with pytest.raises(ValueError, match=r"ScaledLinear, not a plain nn\.Linear"):
        patch(scaled)
    for model in (base, bert, scaled):  # nothing left behind by a refused patch
        assert "_smoothce_patch" not in model.__dict__
        assert "forward" not in model.__dict__


def test_softcapped_model_fused():
    """Gemma 2 fused: the model skips its cap for that forward only (config restored, after an error too), the
    loss caps instead: a cap that bites (logits of tens, cap 3) still gives the stock loss and gradients."""
    model = build("gemma2")
    model.config.final_logit_softcapping = 3.0
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(200.0)
    reference = stock_copy(model, 0.1)
    patch(model, label_smoothing=0.1)
    assert reference(**batch()).logits.abs().max() > 2.9  # capped at 3, close to it: the cap bites
    output, grads = loss_and_grads(model, batch())
    assert output.logits is None
    assert_parity(output, grads, *loss_and_grads(reference, batch()), rtol=1e-5)
    assert model.config.final_logit_softcapping == 3.0
    with pytest.raises(ValueError, match="10 positions of logits"):
        model(**{**batch(), "logits_to_keep": 5})  # 2 x 5 positions, 24 targets
    assert model.config.final_logit_softcapping == 3.0
    model.eval()  # eval: the stock forward, the model caps its logits itself
    with torch.no_grad():
        torch.testing.assert_close(model(**batch()).logits, reference.eval()(**batch()).logits, rtol=0, atol=0)


def test_softcapping_key_the_model_ignores():
    """A config with final_logit_softcapping for a model whose forward never reads it (Llama): no cap added."""
    config = transformers.LlamaConfig(**_DECODER, final_logit_softcapping=0.5)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).train()
    assert model.config.final_logit_softcapping == 0.5
    reference = stock_copy(model, 0.0)
    patch(model)
    assert_parity(*loss_and_grads(model, batch()), *loss_and_grads(reference, batch()), rtol=1e-5)


def test_logit_transform_found_at_run_time():
    """A model that scales its logits after the head (Granite), which no config key of ours names, raises."""
    config = transformers.GraniteConfig(**_DECODER, logits_scaling=4.0)
    torch.manual_seed(0)
    model = patch(transformers.GraniteForCausalLM(config).train())
    with pytest.raises(RuntimeError, match=r"changed its LM head's output.*fused_linear=False"):
        model(**batch())
    assert "forward" not in model.lm_head.__dict__  # the head is restored after the error
    reference = copy.deepcopy(unpatch(model))
    patch(model, fused_linear=False)
    torch.testing.assert_close(model(**batch()).loss, reference(**batch()).loss, rtol=1e-5, atol=0)


def test_bad_options():
    model = build("llama")
    with pytest.raises(ValueError, match=r"z_loss must be a finite number >= 0, got -0\.001"):
        patch(model, z_loss=-1e-3)
    with pytest.raises(ValueError, match="z_loss must be a finite number >= 0"):
        patch(model, z_loss=float("nan"))
    with pytest.raises(TypeError, match="z_loss must be a float"):
        patch(model, z_loss=True)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        patch(model, label_smoothing=1.5)
    with pytest.raises(TypeError, match="label_smoothing"):
        patch(model, label_smoothing=True)
    with pytest.raises(TypeError, match="fused_linear"):
        patch(model, fused_linear=1)
    assert "_smoothce_patch" not in model.__dict__


def test_import_smoothce_does_not_import_transformers():
    code = "import sys, smoothce, smoothce.integrations.transformers; print('transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------


class _TokenData(torch.utils.data.Dataset):
    """Rows of different lengths (padding labelled -100), so micro-batches hold different token counts."""

    def __init__(self, rows=80, seq=SEQ):
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(0, VOCAB, (rows, seq), generator=generator)
        lengths = torch.randint(2, seq + 1, (rows,), generator=generator)
        self.attention_mask = (torch.arange(seq) < lengths[:, None]).long()
        self.labels = self.input_ids.masked_fill(self.attention_mask == 0, -100)

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def train(model, tmp_path, steps=20, **overrides):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **overrides,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_TokenData())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("fused", [True, False])
def test_trainer_gradient_accumulation(fused, tmp_path, monkeypatch):
    """20 optimizer steps, 2 micro-batches each, fp32: the logged losses within 1e-4 of the stock model's."""
    calls = []
    name = "linear_cross_entropy" if fused else "cross_entropy"
    original = getattr(smoothce, name)
    monkeypatch.setattr(smoothce, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    model = build("llama")
    reference = copy.deepcopy(model)
    losses = train(patch(model, fused_linear=fused), tmp_path / "patched")
    stock_losses = train(reference, tmp_path / "stock")
    assert len(losses) == len(stock_losses) == 20
    assert losses == pytest.approx(stock_losses, abs=1e-4, rel=0)
    assert len(calls) == 40  # every micro-batch's loss went through smoothce


def test_trainer_bf16(tmp_path):
    """bf16 autocast through accelerate's wrapped forward: the fused loss, within bf16's spread of stock."""
    model = build("llama")
    reference = copy.deepcopy(model)
    losses = train(patch(model, label_smoothing=0.0), tmp_path / "patched", steps=4, bf16=True)
    stock_losses = train(reference, tmp_path / "stock", steps=4, bf16=True)
    assert losses == pytest.approx(stock_losses, rel=2e-2)


# ---------------------------------------------------------------------------------------
# Memory: the size, one step each in a fresh process
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc (Linux)")
def test_memory_one_step_vocab_128k(tmp_path):
    """V = 128256, batch 2 x 1024, CPU: the patched step's peak at least 2x the fp32 logits below stock's."""
    script = ROOT / "examples" / "transformers_step.py"
    if not script.exists():
        pytest.skip("needs the source tree's examples/ folder")
    out = tmp_path / "step.json"
    done = subprocess.run(
        [sys.executable, str(script), "--reps", "0", "--variants", "stock,fused", "--json", str(out)],
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    stock, fused = results["runs"]["stock"], results["runs"]["fused"]
    assert fused["loss"] == pytest.approx(stock["loss"], rel=1e-5)
    saved = stock["extra_peak_bytes"] - fused["extra_peak_bytes"]
    assert saved >= 2 * results["fp32_logits_bytes"], results
