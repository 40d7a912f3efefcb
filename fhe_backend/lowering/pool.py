"""Pooling: average pooling as a leveled depth-wise sum, max pooling with Concrete's maxpool."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.fx as fx
from concrete import fhe

from .context import Encrypted, LoweringContext, shape_of, with_value
from .linear import pad_trailing
from .registry import register

aten = torch.ops.aten


def _pairs(value, ndim: int = 2):
    value = list(value) if isinstance(value, (list, tuple)) else [value]
    return value * ndim if len(value) == 1 else value


def _avg_reason(node: fx.Node) -> Optional[str]:
    args = list(node.args) + [None] * 7
    padding, ceil_mode, count_include_pad, divisor = args[3], args[4], args[5], args[6]
    if ceil_mode:
        return "avg_pool2d with ceil_mode=True has no FHE lowering"
    if divisor is not None:
        return "avg_pool2d with divisor_override has no FHE lowering"
    if count_include_pad is False and any(_pairs(padding or 0)):
        return "avg_pool2d with padding and count_include_pad=False has no FHE lowering"
    return None


@register(aten.avg_pool2d.default, validator=_avg_reason)
def avg_pool2d(
    ctx: LoweringContext,
    x,
    kernel_size,
    stride=(),
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
):
    """Average pooling: a depth-wise convolution with a kernel of ones, scale / window size.

    With approximate rounding, a window of at most 2**`pool_sum_bits` elements (an option,
    DEFAULT_POOL_SUM_BITS) leaves a sum the next linear op reads without a lookup (its
    accumulator gets that many more bits); the program lists those pools in `pool_sums`."""
    x = ctx.as_linear_input(x)
    kernel = _pairs(kernel_size)
    stride = _pairs(stride) if stride else kernel
    padding = _pairs(padding)
    channels = shape_of(x.expr)[1]
    ones = np.ones((channels, 1, *kernel), dtype=np.int64)
    acc = fhe.conv(pad_trailing(x.centered, padding), ones, None, strides=stride, group=channels)
    window = int(np.prod(kernel))
    # the window sum is an integer with zero-point 0: a small one is a linear op's input as it is
    rounding = ctx.settings.rounding_threshold_bits
    fresh = window <= 2**ctx.settings.pool_sum_bits and rounding is not None and rounding.approximate
    if fresh and window > 1:
        ctx.program.pool_sums.add(ctx.node.name)
    return Encrypted(acc, x.scale / window, 0.0, fresh=fresh)


def _max_reason(node: fx.Node) -> Optional[str]:
    args = list(node.args) + [None] * 6
    padding, ceil_mode = args[3], args[5]
    if any(_pairs(padding or 0)):
        return "max_pool2d with padding has no FHE lowering"
    if ceil_mode:
        return "max_pool2d with ceil_mode=True has no FHE lowering"
    return None


def _max_commutes(x: Encrypted) -> bool:
    """True when max over a window of the integers is the integer of the max of the floats."""
    if not x.affine or not np.all(np.asarray(x.scale) > 0):
        return False
    if x.uniform:
        return True
    return all(all(d == 1 for i, d in enumerate(np.shape(a)) if i != 1) for a in (x.scale, x.zero_point))


@register(aten.max_pool2d_with_indices.default, validator=_max_reason)
def max_pool2d(ctx: LoweringContext, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    """Max pooling on the integers: monotone for a positive scale that is uniform or varies only
    by channel (a convolution's per-channel weights); any other value is requantized first, and
    so is a wide one (an accumulator): Concrete's maxpool compares at its input's width, and a
    convolution's 13-bit accumulator found no crypto parameters where op_inputs bits compile."""
    if not _max_commutes(x) or not x.fresh:
        x = ctx.materialize(x, stats=ctx.input_stats(0))
    kernel = _pairs(kernel_size)
    stride = _pairs(stride) if stride else kernel
    expr = fhe.maxpool(
        x.expr, kernel_shape=tuple(kernel), strides=tuple(stride), dilations=tuple(_pairs(dilation))
    )
    # not fresh: a linear op reading it directly would give Concrete's comparisons inside the
    # maxpool its accumulator's width (operands of leveled ops share one); requantized first,
    # they stay at op_inputs bits (a conv -> maxpool -> linear at 7 bits: no crypto parameters)
    return with_value(x, expr=expr, fresh=False), None
