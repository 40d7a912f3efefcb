"""Data movement: reshape, permute, expand, cat, slice, select, index, pad, getitem. All leveled.

Where each value keeps the batch, and which of these ops would mix samples, is decided by the
batch rules of `lowering.batch` (from traced shapes), not by the validators here: a circuit
compiled for one sample runs any batch.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.fx as fx

from .batch import VIEW_RESHAPES
from .context import Encrypted, LoweringContext, shape_of, with_value
from .linear import pad_constant
from .registry import batch_dim_reason, is_constant, meta_shape, register

aten = torch.ops.aten


def _varies_along_last_only(array: Any) -> bool:
    return np.ndim(array) == 0 or all(d == 1 for d in np.shape(array)[:-1])


def move(ctx: LoweringContext, x: Any, apply: Callable[[Any], Any]) -> Any:
    """Apply a data-movement function to an encrypted value (its scale/zero-point follow)."""
    if x.uniform or (x.fn is not None and not x.positional):
        return with_value(x, expr=apply(x.expr))
    expr = apply(x.expr)
    if (
        x.affine
        and _varies_along_last_only(x.scale)
        and _varies_along_last_only(x.zero_point)
        and shape_of(expr)[-1:] == shape_of(x.expr)[-1:]
    ):
        keep = lambda a: a if np.ndim(a) == 0 else np.reshape(a, (1,) * (len(shape_of(expr)) - 1) + (-1,))  # noqa: E731
        return with_value(x, expr=expr, scale=keep(x.scale), zero_point=keep(x.zero_point))
    x = ctx.materialize(x)
    return with_value(x, expr=apply(x.expr))


@register(*VIEW_RESHAPES)
def reshape(ctx: LoweringContext, x, *args, **kwargs):
    """view, reshape, flatten, squeeze, unsqueeze: a reshape to the recorded shape."""
    return move(ctx, x, lambda e: e.reshape(ctx.out_shape(like=e)))


@register(aten.permute.default)
def permute(ctx: LoweringContext, x, dims):
    """permute / transpose of non-batch dims."""
    return move(ctx, x, lambda e: np.transpose(e, [d % len(shape_of(e)) for d in dims]))


@register(aten.expand.default)
def expand(ctx: LoweringContext, x, sizes, implicit=False):
    """Tensor.expand over non-batch dims."""
    return move(ctx, x, lambda e: np.broadcast_to(e, ctx.out_shape(like=e)))


def _dim_arg_reason(node: fx.Node) -> Optional[str]:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return batch_dim_reason(dim, node, "dim")


def _index(ndim: int, dim: int, item: Any) -> tuple:
    return (slice(None),) * (dim % ndim) + (item,)


def _slice_reason(node: fx.Node) -> Optional[str]:
    if _is_full_slice(node):
        return None  # x[:, ...] keeps every sample: a no-op on the batch-major dim 0
    return _dim_arg_reason(node)


def _is_full_slice(node: fx.Node) -> bool:
    """True for a slice that keeps every position of its dim (start 0, step 1, end past it)."""
    args = list(node.args) + [None] * (5 - len(node.args))
    dim = args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    start = args[2] if len(node.args) > 2 else node.kwargs.get("start")
    end = args[3] if len(node.args) > 3 else node.kwargs.get("end")
    step = args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
    shape = meta_shape(node.args[0])
    if shape is None or start not in (None, 0) or step not in (None, 1):
        return False
    size = shape[dim % len(shape)] if shape else None
    if end is None:
        return True
    try:
        return bool(end >= size)
    except Exception:  # noqa: BLE001 - symbolic sizes that cannot be compared
        return end >= 2**62


@register(aten.slice.Tensor, validator=_slice_reason)
def slice_tensor(ctx: LoweringContext, x, dim=0, start=None, end=None, step=1):
    """Slicing along a non-batch dim."""
    return move(ctx, x, lambda e: e[_index(len(shape_of(e)), dim, slice(start, end, step))])


@register(aten.select.int, validator=_dim_arg_reason)
def select(ctx: LoweringContext, x, dim, index):
    """Indexing one position of a non-batch dim."""
    return move(ctx, x, lambda e: e[_index(len(shape_of(e)), dim, index)])


def _cat_reason(node: fx.Node) -> Optional[str]:
    tensors = node.args[0]
    if any(is_constant(t) for t in tensors):
        return "cat of encrypted and constant tensors has no FHE lowering"
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return batch_dim_reason(dim, node, "dim")


@register(aten.cat.default, validator=_cat_reason)
def cat(ctx: LoweringContext, tensors, dim=0):
    """Concatenation along a non-batch dim; different scales become a per-position scale."""
    values = [t if t.affine else ctx.materialize(t) for t in tensors]
    ndim = len(shape_of(values[0].expr))
    axis = dim % ndim
    expr = np.concatenate(tuple(v.expr for v in values), axis=axis)
    first = values[0]
    if all(
        v.uniform and np.isclose(v.scale, first.scale) and np.isclose(v.zero_point, first.zero_point)
        for v in values
    ):
        return Encrypted(expr, first.scale, first.zero_point, fresh=all(v.fresh for v in values))

    def per_position(field: str) -> np.ndarray:
        parts = [np.broadcast_to(getattr(v, field), (1, *shape_of(v.expr)[1:])) for v in values]
        return np.concatenate(parts, axis=axis)

    return Encrypted(expr, per_position("scale"), per_position("zero_point"))


def _split_reason(node: fx.Node) -> Optional[str]:
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return batch_dim_reason(dim, node, "dim")


@register(aten.split_with_sizes.default, aten.split.Tensor, validator=_split_reason)
def split(ctx: LoweringContext, x, split_size_or_sizes, dim=0):
    """torch.split / torch.chunk along a non-batch dim: one slice per piece (leveled)."""
    size = shape_of(x.expr)[dim % len(shape_of(x.expr))]
    if isinstance(split_size_or_sizes, int):
        sizes = [
            min(split_size_or_sizes, size - start) for start in range(0, size, max(split_size_or_sizes, 1))
        ]
    else:
        sizes = [int(s) for s in split_size_or_sizes]
    starts = np.cumsum([0] + sizes[:-1])
    return [
        slice_tensor(ctx, x, dim, int(start), int(start) + length) for start, length in zip(starts, sizes)
    ]


@register(aten.full_like.default)
def full_like(ctx: LoweringContext, x, fill_value, **kwargs):
    """torch.zeros_like / ones_like / full_like of an encrypted value: a clear constant shaped like
    one sample (it broadcasts over the batch), whatever the encrypted values are."""
    return torch.full((1, *shape_of(x.expr)[1:]), float(fill_value), dtype=torch.float64)


# multi-output ops whose extra outputs (indices, saved statistics) are not computed in FHE
FIRST_OUTPUT_ONLY = {
    aten.max_pool2d_with_indices.default: "max_pool2d indices",
    aten.max.dim: "torch.max indices",
    aten.min.dim: "torch.min indices",
    aten.native_layer_norm.default: "layer_norm mean/rstd",
    aten._native_batch_norm_legit_no_training.default: "batch_norm statistics",
}


def _getitem_reason(node: fx.Node) -> Optional[str]:
    source, index = node.args
    what = FIRST_OUTPUT_ONLY.get(getattr(source, "target", None))
    if what is not None and index != 0:
        return f"{what} are not computed in FHE"
    return None


@register(operator.getitem, validator=_getitem_reason)
def getitem(ctx: LoweringContext, values, index):
    """Pick one result of a multi-output op."""
    return values[index]


def _index_reason(node: fx.Node) -> Optional[str]:
    indices = list(node.args[1])
    if not indices:
        return "indexing without index tensors has no FHE lowering"
    if not all(i is None or is_constant(i) for i in indices):
        return "indexing with an encrypted index tensor has no FHE lowering"
    return None


@register(aten.index.Tensor, validator=_index_reason)
def index(ctx: LoweringContext, x, indices):
    """x[:, idx, ...] with constant index tensors (gathers, e.g. nn.Unfold's im2col)."""
    item = tuple(slice(None) if i is None else np.asarray(i, dtype=np.int64) for i in indices)
    return move(ctx, x, lambda e: e[item])


@register(aten.constant_pad_nd.default)
def constant_pad(ctx: LoweringContext, x, pad, value=0.0):
    """F.pad(x, pad, value=c): padding integers that decode exactly to c (per-position zero-point
    when c is off the value's grid); negative pads crop."""
    pairs = [(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)][::-1]
    if not x.uniform:
        x = ctx.materialize(x)
    exact = float(value) / float(x.scale) + float(x.zero_point)
    padded_q = int(np.rint(exact))
    expr = pad_constant(x.expr, pairs, padded_q)
    if np.isclose(exact, padded_q):
        return with_value(x, expr=expr)
    padding = pad_constant(np.zeros((1, *shape_of(x.expr)[1:]), dtype=np.int64), pairs, 1)
    zero_point = np.where(padding == 1, padded_q - float(value) / float(x.scale), x.zero_point)
    return Encrypted(expr, x.scale, zero_point)
