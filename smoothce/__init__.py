"""smoothce: label-smoothed cross-entropy for PyTorch, loss and gradient in one forward pass.

``import smoothce`` registers ``torch.ops.smoothce.cross_entropy`` and the backends:
"cpu" (vectorized torch), "cuda-triton" and "xpu-triton" (Triton kernels, imported
only when used).
"""

from smoothce import _ops, registry  # noqa: F401  (registers the ops)
from smoothce._autograd import inplace_backward
from smoothce._backends_setup import register_builtin_backends
from smoothce.distributed import count_tokens, vocab_parallel_cross_entropy
from smoothce.functional import cross_entropy
from smoothce.linear import linear_cross_entropy
from smoothce.module import CrossEntropyLoss, LinearCrossEntropyLoss
from smoothce.vocab_parallel_linear import vocab_parallel_linear_cross_entropy

register_builtin_backends()

__all__ = [
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "count_tokens",
    "cross_entropy",
    "inplace_backward",
    "linear_cross_entropy",
    "registry",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]
__version__ = "0.1.0"
