"""The one way smoothce registers an op: its schema, then a composite body or a kernel and its fake."""

from __future__ import annotations

import torch

LIBRARY = torch.library.Library("smoothce", "DEF")


def define(schema: str, *, composite=None, kernel=None, fake=None):
    """Define ``smoothce::<schema>`` on public ``torch.library`` calls and return its default overload.

    composite: the op's body written in other ops (CompositeImplicitAutograd), so that autograd and
        torch.compile trace through it to those ops.
    kernel, fake: the computation for every device type (CompositeExplicitAutograd: it asks the
        registry for the tensors' backend, so third-party backends and devices without one, which get
        the registry's clear error, need no registration of their own) and its shapes-only twin for
        fake and meta tensors (torch.compile). A schema that writes into an argument
        (``Tensor(a!)``), which torch.compile functionalises and Inductor writes in place again.
    """
    name = schema.split("(", 1)[0]
    qualname = f"smoothce::{name}"
    torch.library.define(qualname, schema[len(name) :], lib=LIBRARY)
    if composite is not None:
        torch.library.impl(qualname, "CompositeImplicitAutograd", composite, lib=LIBRARY)
    else:
        torch.library.impl(qualname, "CompositeExplicitAutograd", kernel, lib=LIBRARY)
        torch.library.register_fake(qualname, fake, lib=LIBRARY)
    return getattr(torch.ops.smoothce, name).default
