"""Hugging Face transformers: ``patch(model)`` makes a causal LM compute its loss with smoothce, in one line.

``fused_linear=True``: in training mode with labels, the loss comes from the final hidden states through
``smoothce.linear_cross_entropy`` and the (batch, seq, V) logits are never built (``logits`` is None);
otherwise the model runs as before, its loss through ``smoothce.cross_entropy``. ``fused_linear=False``:
only the model's ``loss_function`` is replaced. transformers is imported by ``patch``, not by this module.
A model that soft-caps its logits (``config.final_logit_softcapping``, Gemma 2) has the fused loss cap
them instead (``softcap=``).
"""

from __future__ import annotations

import inspect
import numbers
import types

import torch
import torch.nn.functional as F
from torch import nn

import smoothce
from smoothce.checks import recipe_values

__all__ = ["patch", "unpatch"]

# The attribute patch() keeps on the model: options, and what it replaced, to undo it.
_STATE = "_smoothce_patch"
_MISSING = object()


def patch(model: nn.Module, *, label_smoothing: float = 0.0, z_loss: float = 0.0, fused_linear: bool = True):
    """Make ``model`` (a transformers ``*ForCausalLM`` instance) compute its loss with smoothce; returns it.

    The loss keeps the stock causal LM loss's meaning (``transformers.loss.loss_utils.ForCausalLMLoss``):
    labels padded with ``ignore_index`` and shifted by one (or ``shift_labels`` as given), ``ignore_index``
    (-100), the mean over non-ignored targets, or the sum divided by ``num_items_in_batch`` when given
    (what ``Trainer`` passes under gradient accumulation), plus label smoothing ``label_smoothing`` as
    ``F.cross_entropy(..., label_smoothing=label_smoothing)`` means it, and the z-loss
    ``z_loss`` x logsumexp(logits)^2 added to each counted target's loss before that reduction (PaLM's,
    ``smoothce.cross_entropy(z_loss=)``). Two differences, smoothce's own: a mean over no targets is 0.0
    (stock: NaN), and the loss is computed without up-casting the logits.

    fused_linear: True, in training mode with ``labels``, computes the loss from the LM head's input
        through ``smoothce.linear_cross_entropy``: no logits (the output's ``logits`` is None). In eval
        mode or without labels the model returns its logits as before (``generate()`` is untouched).
        A model that soft-caps its logits through ``config.final_logit_softcapping`` (Gemma 2) skips
        that in the fused forward and the loss caps them instead (``softcap=``), the same loss.
        False only replaces the model's ``loss_function`` (logits built, and capped, as usual).
    z_loss: s >= 0, the weight of the z-loss (0: none).

    Patching again changes the options; ``unpatch(model)`` restores the stock behaviour.
    """
    z_loss = _check_options(label_smoothing, z_loss, fused_linear)
    state = model.__dict__.get(_STATE) if isinstance(model, nn.Module) else None
    if state is None:
        _check_model(model)
    options = {"label_smoothing": float(label_smoothing), "z_loss": z_loss, "fused_linear": bool(fused_linear)}
    if state is not None:
        state.options = options
        return model
    state = _PatchState(model, options)
    model.__dict__[_STATE] = state
    model.loss_function = _CausalLMLoss(state)
    model.forward = types.MethodType(_make_forward(state.signature), model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch(model)``: the stock forward and loss function again. Harmless on an unpatched model."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return model
    forward = model.__dict__.get("forward")
    if getattr(getattr(forward, "__func__", None), "_smoothce_forward", False):
        if state.instance_forward is _MISSING:
            del model.__dict__["forward"]
        else:
            model.__dict__["forward"] = state.instance_forward
    # else a wrapper (accelerate's autocast, say) holds our forward: with the state gone it runs the stock one.
    if state.loss_function is _MISSING:
        model.__dict__.pop("_loss_function", None)
    else:
        model.__dict__["_loss_function"] = state.loss_function
    return model


# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------


def _check_options(label_smoothing, z_loss, fused_linear) -> float:
    """TypeError/ValueError naming a bad option; returns ``z_loss`` as a float."""
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not isinstance(fused_linear, bool):
        raise TypeError(f"fused_linear must be True or False, got {fused_linear!r}")
    return recipe_values(z_loss, None)[0]


def _stock_causal_lm_loss():
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError as error:
        raise ImportError(
            "smoothce.integrations.transformers needs transformers: pip install 'smoothce[transformers]'"
        ) from error
    return ForCausalLMLoss


def _check_model(model) -> None:
    """A model we can patch: an LM head that is a plain nn.Linear, and transformers' causal LM loss."""
    stock_loss = _stock_causal_lm_loss()
    name = type(model).__name__
    if not isinstance(model, nn.Module) or not callable(getattr(model, "get_output_embeddings", None)):
        raise TypeError(f"patch() takes a transformers model (a *ForCausalLM instance), got {name}")
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(
            f"{name} has no output layer (get_output_embeddings() is None): patch the *ForCausalLM model, "
            "not its base model"
        )
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise ValueError(
            f"{name}'s output layer is a {type(head).__name__}, not a plain nn.Linear (hidden @ W.T + b); "
            "smoothce cannot compute its logits"
        )
    if head.weight.dim() != 2 or not head.weight.is_floating_point():
        raise ValueError(
            f"{name}'s output layer has a {head.weight.dtype} weight of shape {tuple(head.weight.shape)}, "
            "not a floating (V, D) matrix"
        )
    loss_function = getattr(model, "loss_function", None)
    if loss_function is not stock_loss:
        raise ValueError(
            f"{name}'s loss_function is {getattr(loss_function, '__name__', loss_function)!r}, not transformers' "
            "causal LM loss (ForCausalLMLoss): patch() replaces only that one"
        )


# ---------------------------------------------------------------------------------------
# The patched forward and loss
# ---------------------------------------------------------------------------------------


class _PatchState:
    """One patched model: its options, what patch() replaced, and the fused call in flight."""

    def __init__(self, model: nn.Module, options: dict):
        self.options = options
        self.instance_forward = model.__dict__.get("forward", _MISSING)
        self.loss_function = model.__dict__.get("_loss_function", _MISSING)
        self.stock_forward = model.forward
        self.signature = inspect.signature(self.stock_forward)
        self.capture: _HeadCapture | None = None
        self.caps_by_config = _caps_by_config(type(model))


def _caps_by_config(cls) -> bool:
    """Whether ``cls.forward`` reads ``config.final_logit_softcapping`` (Gemma 2's pattern), read from its source.

    Only then does the fused forward hand the cap to the loss: a config carrying the key for a model that
    ignores it adds no cap, and where the source cannot be read the model caps as it will, which the
    loss function then refuses (its LM head's output changed) rather than compute another loss.
    """
    try:
        return "config.final_logit_softcapping" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


class _HeadCapture:
    """Stands in for the LM head during one fused forward: records its input, returns a stand-in for the logits.

    The stand-in is one float32 value expanded to the logits' shape (no memory). The model hands it to
    its ``loss_function``, which recognises it and takes the loss from the recorded hidden states; a
    model that transforms its logits first (a scale, a soft-cap other than through
    ``config.final_logit_softcapping``) hands over another tensor, and the loss function raises rather
    than compute the wrong loss. ``softcap``: the cap the loss applies for the model (or None).
    """

    def __init__(self, head: nn.Linear, softcap: float | None):
        self.head = head
        self.softcap = softcap
        self.hidden: torch.Tensor | None = None
        self.stand_in: torch.Tensor | None = None
        self.consumed = False

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden is not None:
            raise RuntimeError("the LM head was called twice in one forward: use patch(model, fused_linear=False)")
        self.hidden = hidden
        shape = (*hidden.shape[:-1], self.head.out_features)
        self.stand_in = hidden.new_zeros((), dtype=torch.float32).expand(shape)
        return self.stand_in


def _labels_given(signature: inspect.Signature, args, kwargs) -> bool:
    try:
        arguments = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return False  # the stock forward raises its own error
    if arguments.get("labels") is not None:
        return True
    var_keyword = [p.name for p in signature.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
    return bool(var_keyword) and arguments.get(var_keyword[0], {}).get("labels") is not None


def _make_forward(signature: inspect.Signature):
    """The model's forward, one per model so it carries the stock signature (Trainer reads it)."""

    def forward(self, *args, **kwargs):
        state = self.__dict__.get(_STATE)
        if state is None:  # unpatched while a wrapper still holds this function
            return type(self).forward(self, *args, **kwargs)
        if not (state.options["fused_linear"] and self.training and _labels_given(state.signature, args, kwargs)):
            return state.stock_forward(*args, **kwargs)
        head = self.get_output_embeddings()
        # Gemma 2 and its kin cap the head's output when config.final_logit_softcapping is set: for this
        # forward the model is told not to, and the fused loss caps the logits instead.
        config = getattr(self, "config", None)
        softcap = getattr(config, "final_logit_softcapping", None) if state.caps_by_config else None
        capture = _HeadCapture(head, softcap)
        previous = head.__dict__.get("forward", _MISSING)
        head.__dict__["forward"] = capture
        state.capture = capture
        if capture.softcap is not None:
            config.final_logit_softcapping = None
        try:
            output = state.stock_forward(*args, **kwargs)
        finally:
            state.capture = None
            if capture.softcap is not None:
                config.final_logit_softcapping = capture.softcap
            if previous is _MISSING:
                del head.__dict__["forward"]
            else:
                head.__dict__["forward"] = previous
        if not capture.consumed:
            raise RuntimeError(
                f"{type(self).__name__} did not pass its LM head's output to self.loss_function, so the fused loss "
                "was never computed: use patch(model, fused_linear=False)"
            )
        return _without_logits(output, capture.stand_in)

    forward._smoothce_forward = True
    forward.__signature__ = signature.replace(
        parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *signature.parameters.values()]
    )
    return forward


def _without_logits(output, stand_in):
    """The model's output with ``logits`` None: the stand-in never leaves the forward."""
    if isinstance(output, tuple):
        return tuple(value for value in output if value is not stand_in)
    return type(output)(**{key: value for key, value in output.items() if value is not stand_in})


def _shifted_targets(labels, shift_labels, ignore_index) -> torch.Tensor:
    """The targets of the stock causal LM loss, flattened: labels[1:] then ignore_index, or shift_labels as given."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("the causal LM loss needs labels or shift_labels, got neither")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _autocast_inputs(*tensors):
    """The tensors as autocast would hand them to F.linear (the autocast dtype, float64 kept), and the device type."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return device_type, tensors
    dtype = torch.get_autocast_dtype(device_type)
    cast = [t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors]
    return device_type, cast


class _CausalLMLoss:
    """The patched model's ``loss_function``: the stock causal LM loss's arguments and meaning, on smoothce."""

    def __init__(self, state: _PatchState):
        self.state = state

    def __call__(
        self,
        logits,
        labels=None,
        vocab_size=None,
        num_items_in_batch=None,
        ignore_index=-100,
        shift_labels=None,
        **kwargs,
    ):
        target = _shifted_targets(labels, shift_labels, ignore_index)
        options = self.state.options
        # The sum over targets divided by num_items_in_batch when given (gradient accumulation), else the mean;
        # either way the division is in the op, so backward has nothing to scale (dO = 1).
        reduce = {"reduction": "mean", "normalizer": num_items_in_batch}
        capture = self.state.capture
        if capture is not None:
            if logits is not capture.stand_in:
                raise RuntimeError(
                    "the model changed its LM head's output before the loss (a scale or soft-cap of the logits "
                    "other than config.final_logit_softcapping), which the fused loss cannot see: use "
                    "patch(model, fused_linear=False)"
                )
            capture.consumed = True
            hidden = capture.hidden.reshape(-1, capture.hidden.shape[-1])
            if hidden.shape[0] != target.numel():
                raise ValueError(
                    f"{hidden.shape[0]} positions of logits (after logits_to_keep) but {target.numel()} targets"
                )
            device_type, (hidden, weight, bias) = _autocast_inputs(hidden, capture.head.weight, capture.head.bias)
            with torch.autocast(device_type, enabled=False):
                loss = smoothce.linear_cross_entropy(
                    hidden,
                    weight,
                    target.to(hidden.device),
                    bias=bias,
                    label_smoothing=options["label_smoothing"],
                    ignore_index=ignore_index,
                    z_loss=options["z_loss"],
                    softcap=capture.softcap,
                    **reduce,
                )
        else:
            if vocab_size is not None and logits.shape[-1] != vocab_size:
                raise ValueError(f"logits have {logits.shape[-1]} classes but vocab_size is {vocab_size}")
            rows = logits.reshape(-1, logits.shape[-1])
            if rows.shape[0] != target.numel():
                raise ValueError(f"{rows.shape[0]} rows of logits but {target.numel()} targets")
            with torch.autocast(rows.device.type, enabled=False):
                loss = smoothce.cross_entropy(
                    rows,
                    target.to(rows.device),
                    label_smoothing=options["label_smoothing"],
                    ignore_index=ignore_index,
                    z_loss=options["z_loss"],
                    **reduce,
                )
        return loss
