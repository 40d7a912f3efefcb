"""Leveled linear ops: matmul/linear/conv with constant weights, encrypted matmul, sums.

Inputs are centered (q - zero_point) so padding and zero-points need no correction terms;
weights are quantized symmetrically per output channel; the accumulator keeps the product of
scales (per channel) and the bias becomes its zero-point. No table lookup happens here.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.fx as fx
from concrete import fhe

from ..quantization.quantizers import quantize_weights
from ..settings import RANGE_CAPPED
from .context import Encrypted, LoweringContext, constant_array, is_encrypted, shape_of
from .elementwise import signed_product
from .registry import batch_dim_reason, is_constant, meta_shape, op_name, register

aten = torch.ops.aten


def _weights(ctx: LoweringContext, weight, channel_axis: int, accumulate=None, out_axis: int = -1):
    """Integer weights and their scale (cached per node).

    `accumulate(integer weights)` gives the layer's integer accumulator on this run's inputs
    (see `_on_calibration_data`); with it, per-channel weights keep the accumulator within the
    range per-tensor ones give (`quantize_weights`).
    """
    per_channel = ctx.settings.per_channel_weights
    return ctx.cache(
        f"weights{channel_axis}",
        lambda: quantize_weights(
            constant_array(weight),
            ctx.settings.n_bits.op_weights,
            channel_axis if per_channel else None,
            accumulate,
            out_axis,
        ),
    )


def _on_calibration_data(ctx: LoweringContext, operand, accumulate):
    """`accumulate` on a calibration run (a numpy operand) where per-channel weights are range
    capped, else None: with `per_channel_weights="range_capped"`, and by default where lookups
    round exactly (each accumulator bit then costs a bootstrap per lookup). Elsewhere the
    per-channel precision can be worth more (a tiny GPT-2 block at n_bits 8, approximate rounding,
    flipped a token's argmax with the cap); `precision_search` tries both."""
    settings = ctx.settings
    rounding = settings.rounding_threshold_bits
    exact = rounding is not None and not rounding.approximate
    capped = exact or settings.per_channel_weights == RANGE_CAPPED
    return accumulate if capped and isinstance(operand, np.ndarray) else None


def matmul(ctx: LoweringContext, a, b) -> Encrypted:
    """a @ b with at least one encrypted operand."""
    if is_encrypted(a) and is_encrypted(b):
        a, b = ctx.as_linear_input(a), ctx.as_linear_input(b)
        if not b.uniform or not a.uniform:
            a, b = ctx.materialize(a), ctx.materialize(b)
        return Encrypted(signed_product(ctx, a.centered, b.centered, matmul=True), a.scale * b.scale, 0.0)
    if is_encrypted(a):
        a = ctx.as_linear_input(a)
        x = a.centered
        q_w, s_w = _weights(ctx, b, -1, _on_calibration_data(ctx, x, lambda q: x @ q), -1)
        return Encrypted(x @ q_w, a.scale * s_w, 0.0)
    b = ctx.as_linear_input(b)
    x = b.centered
    q_w, s_w = _weights(ctx, a, -2, _on_calibration_data(ctx, x, lambda q: q @ x), -2)
    return Encrypted(q_w @ x, b.scale * s_w, 0.0)


def _with_bias(value: Encrypted, bias, beta: float = 1.0) -> Encrypted:
    if bias is None:
        return value
    bias = constant_array(bias) * beta
    value.zero_point = value.zero_point - bias / value.scale
    return value


def pad_trailing(expr, pads, value: int = 0):
    """Pad the trailing len(pads) dims by pads[i] on both sides (Concrete's conv has no padding)."""
    return pad_constant(expr, [(p, p) for p in pads], value)


def pad_constant(expr, pads, value: int = 0):
    """Pad the trailing len(pads) dims by pads[i] = (before, after) integers of `value`.

    Negative amounts crop. Concrete has no np.pad: encrypted values are written into a larger
    fhe.zeros tensor by slice assignment.
    """
    lead = len(shape_of(expr)) - len(pads)
    crop = tuple(slice(max(-b, 0), s - max(-a, 0)) for s, (b, a) in zip(shape_of(expr)[lead:], pads))
    if any(min(b, a) < 0 for b, a in pads):
        expr = expr[(slice(None),) * lead + crop]
    pads = [(max(b, 0), max(a, 0)) for b, a in pads]
    if not any(b or a for b, a in pads):
        return expr
    shape = shape_of(expr)
    if isinstance(expr, np.ndarray):
        return np.pad(expr, [(0, 0)] * lead + pads, constant_values=value)
    padded = fhe.zeros(shape[:lead] + tuple(s + b + a for s, (b, a) in zip(shape[lead:], pads)))
    if value:
        padded = padded + value
    padded[(slice(None),) * lead + tuple(slice(b, b + s) for s, (b, _) in zip(shape[lead:], pads))] = expr
    return padded


@register(aten.mm.default, aten.bmm.default)
def mm(ctx: LoweringContext, a, b):
    """Matrix product (constant weights or two encrypted operands)."""
    return matmul(ctx, a, b)


def _addmm_reason(node: fx.Node) -> Optional[str]:
    if not is_constant(node.args[0]):
        return f"{op_name(node)} with an encrypted bias is not lowered"
    return None


@register(aten.addmm.default, validator=_addmm_reason)
def addmm(ctx: LoweringContext, bias, a, b, beta=1, alpha=1):
    """bias * beta + alpha * (a @ b): the linear layer."""
    value = matmul(ctx, a, b)
    value.scale = value.scale * alpha
    return _with_bias(value, bias, beta)


def _conv_reason(node: fx.Node) -> Optional[str]:
    x, weight, bias, _, _, _, transposed, *_ = node.args
    if transposed:
        return "transposed convolution has no FHE lowering"
    if not is_constant(weight) or (bias is not None and not is_constant(bias)):
        return "convolution with encrypted weights has no FHE lowering"
    shape = meta_shape(weight)
    if shape is not None and len(shape) not in (3, 4):
        return f"{len(shape) - 2}d convolution has no FHE lowering (1d and 2d do)"
    return None


@register(aten.convolution.default, validator=_conv_reason)
def convolution(
    ctx: LoweringContext, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups
):
    """conv1d/conv2d with constant weights (stride, padding, dilation, groups)."""
    x = ctx.as_linear_input(x)
    inputs = pad_trailing(x.centered, list(padding))
    one_d = len(shape_of(inputs)) == 3  # Concrete has no 1d convolution: 2d over a unit height
    if one_d:
        inputs = inputs.reshape((*shape_of(inputs)[:2], 1, shape_of(inputs)[2]))
        stride, dilation = [1, *stride], [1, *dilation]

    def accumulate(kernel):
        kernel = kernel[:, :, None, :] if one_d else kernel
        acc = fhe.conv(inputs, kernel, None, strides=list(stride), dilations=list(dilation), group=groups)
        return acc.reshape((*shape_of(acc)[:2], shape_of(acc)[3])) if one_d else acc

    q_w, s_w = _weights(ctx, weight, 0, _on_calibration_data(ctx, inputs, accumulate), 1)
    acc = accumulate(q_w)
    channel_shape = (1, -1) + (1,) * (q_w.ndim - 2)
    scale = x.scale * np.reshape(s_w, channel_shape)
    bias = None if bias is None else constant_array(bias).reshape(channel_shape)
    return _with_bias(Encrypted(acc, scale, 0.0), bias)


def _reduce_reason(node: fx.Node) -> Optional[str]:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return batch_dim_reason(dims, node)


def reduce_sum(ctx: LoweringContext, x, dims, keepdim: bool, mean: bool):
    """Sum (or mean when `mean`) of `x` over `dims`: leveled, the scale carries the count."""
    if not is_encrypted(x):
        return ctx.node.target(x, dims, keepdim)
    if not x.uniform:
        x = ctx.materialize(x)
    ndim = len(shape_of(x.expr))
    axes = tuple(sorted(d % ndim for d in dims))
    count = int(np.prod([shape_of(x.expr)[d] for d in axes]))
    expr = np.sum(x.expr, axis=axes, keepdims=bool(keepdim))
    scale = x.scale / count if mean else x.scale
    return Encrypted(expr, scale, x.zero_point * count)


@register(aten.sum.dim_IntList, validator=_reduce_reason)
def sum_dims(ctx: LoweringContext, x, dims, keepdim=False, dtype=None):
    """Sum over non-batch dims: leveled."""
    return reduce_sum(ctx, x, dims, keepdim, mean=False)


@register(aten.mean.dim, validator=_reduce_reason)
def mean_dims(ctx: LoweringContext, x, dims, keepdim=False, dtype=None):
    """Mean over non-batch dims: a leveled sum with the scale divided."""
    return reduce_sum(ctx, x, dims, keepdim, mean=True)


def _extreme_reason(node: fx.Node) -> Optional[str]:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return batch_dim_reason(dims, node)


def reduce_extreme(ctx: LoweringContext, x, dims, keepdim: bool, largest: bool) -> Encrypted:
    """max/min over non-batch dims on the integers (order-preserving for a uniform scale)."""
    if not x.uniform:
        x = ctx.materialize(x, stats=ctx.input_stats(0))
    dims = [dims] if isinstance(dims, int) else list(dims)
    ndim = len(shape_of(x.expr))
    integer_max = largest == bool(np.all(np.asarray(x.scale) > 0))
    expr = x.expr
    for axis in sorted(d % ndim for d in dims):
        expr = _pairwise_extreme(ctx, expr, axis, integer_max)
    if not keepdim:
        kept = [s for axis, s in enumerate(shape_of(expr)) if axis not in {d % ndim for d in dims}]
        expr = expr.reshape(tuple(kept))
    # not fresh: the tree's additions would share the width of a linear op reading it (see
    # pool.max_pool2d); such a reader requantizes it first
    return Encrypted(expr, x.scale, x.zero_point)


def _positive_part(values: np.ndarray) -> np.ndarray:
    return np.maximum(values, 0)


def _pairwise_extreme(ctx: LoweringContext, expr, axis: int, integer_max: bool):
    """Reduce `axis` to size 1 by a tree of max(a, b) = b + relu(a - b) (min: a - relu(a - b)).

    One lookup per tree level on the exact integer difference: ceil(log2(size)) levels, far
    cheaper than Concrete's generic np.max.
    """
    size = shape_of(expr)[axis]
    lead = (slice(None),) * axis
    while size > 1:
        half = size // 2
        a, b = expr[lead + (slice(0, half),)], expr[lead + (slice(half, 2 * half),)]
        positive = ctx.lookup(a - b, _positive_part)
        pair = b + positive if integer_max else a - positive
        if size % 2:
            pair = np.concatenate((pair, expr[lead + (slice(2 * half, size),)]), axis=axis)
        expr, size = pair, half + size % 2
    return expr


@register(aten.amax.default, aten.amin.default, validator=_extreme_reason)
def amax_amin(ctx: LoweringContext, x, dims=(), keepdim=False):
    """amax/amin over non-batch dims."""
    return reduce_extreme(ctx, x, dims, keepdim, largest=ctx.node.target is aten.amax.default)


@register(aten.max.dim, aten.min.dim, validator=_extreme_reason)
def max_min_dim(ctx: LoweringContext, x, dim, keepdim=False):
    """torch.max(x, dim) / torch.min(x, dim): the values (indices are not computed in FHE)."""
    return reduce_extreme(ctx, x, dim, keepdim, largest=ctx.node.target is aten.max.dim), None
