"""Embedding: an encrypted integer index into a constant table, as one positional table lookup.

The index (shape (..., )) is broadcast to (..., width); position j of the lookup reads column j
of the table, so the result is a per-position (multi-)table lookup, fused with whatever
element-wise op follows.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.fx as fx

from .context import Encrypted, LoweringContext, shape_of
from .registry import is_constant, op_name, register

aten = torch.ops.aten


def _embedding_reason(node: fx.Node) -> Optional[str]:
    if not is_constant(node.args[0]):
        return f"{op_name(node)} with an encrypted table has no FHE lowering"
    return None


@register(aten.embedding.default, validator=_embedding_reason)
def embedding(ctx: LoweringContext, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    """nn.Embedding / F.embedding with an encrypted index and a constant table."""
    table = torch.as_tensor(weight).detach().to(torch.float64)
    rows, width = table.shape
    shape = shape_of(indices.expr)
    expr = indices.expr.reshape((*shape, 1)) + np.zeros((width,), dtype=np.int64)
    index_fn = indices.value_fn()
    columns = torch.arange(width)

    def lookup(q):
        position = torch.round(index_fn(q)).long().clamp(0, rows - 1)
        return table[position, columns]

    return Encrypted(expr, fn=lookup, positional=True)
