"""Activations that reach the ATen graph as non-pointwise ops.

Most activations (relu, sigmoid, tanh, gelu, silu, leaky_relu, hardtanh, elu, ...) are pointwise
ATen ops, or decompose into them, and are fused into table lookups by `elementwise`. This module
lowers the remaining ones.
"""

from __future__ import annotations

import torch

from .context import LoweringContext
from .elementwise import fold
from .registry import is_constant, op_name, register

aten = torch.ops.aten


def _prelu_reason(node):
    if not is_constant(node.args[1]):
        return f"{op_name(node)} with an encrypted slope has no FHE lowering"
    return None


@register(aten._prelu_kernel.default, validator=_prelu_reason)
def prelu(ctx: LoweringContext, x, weight):
    """PReLU with a constant (per-channel) slope: one (multi-)table lookup."""
    return fold(ctx, (x, weight), {})
