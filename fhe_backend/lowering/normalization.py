"""Normalizations and softmax: BatchNorm (eval), LayerNorm, Softmax, LogSoftmax, vector norms.

BatchNorm in eval mode is a per-channel affine map: leveled, only scale/zero-point change.
LayerNorm, softmax and vector norms combine table lookups with leveled sums and encrypted
multiplications; the ranges of their intermediate values are measured on the inputset
(`observed_stats`), so every lookup is sized from data, not from worst-case bounds. Their
intermediate values are requantized with `INTERNAL_EXTRA_BITS` more bits than `n_bits` (the
lookups' input widths grow accordingly; `rounding_threshold_bits` caps them as everywhere).

- softmax(x) = e * (1 / sum(e)), e = exp(x - max(x)): integer max (Concrete's np.max), one lookup
  for exp on the exact integer difference, a leveled sum, one reciprocal lookup, one encrypted
  multiplication.
- layer_norm(x) = c * rsqrt(mean(c**2) + eps) * weight + bias, c = x - mean(x): c is exact
  integers (count * q - sum(q)), a lookup squares it, a leveled mean, an rsqrt lookup, an
  encrypted multiplication; weight/bias only change scale and zero-point.
- vector_norm(x, p) = sum(|x| ** p) ** (1/p): one lookup, a leveled sum, the root stays pending
  (fused into the next lookup).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.fx as fx

from ..quantization.calibration import NodeStats
from .context import Encrypted, LoweringContext, constant_array, shape_of, with_value
from .elementwise import combine, multiply, observed_stats, reciprocal
from .linear import reduce_extreme, reduce_sum
from .registry import ONE_SAMPLE_AT_A_TIME, batch_dim_reason, is_constant, meta_shape, op_name, register

aten = torch.ops.aten

INTERNAL_EXTRA_BITS = 2
# operands of an encrypted multiplication: wider ones make products Concrete finds no
# parameters for (NoParametersFound)
MAX_INTERNAL_BITS = 6


def internal_bits(ctx: LoweringContext) -> int:
    """Bit-width of the intermediate values of softmax/layer_norm (op_inputs + extra bits)."""
    return min(ctx.settings.n_bits.op_inputs + INTERNAL_EXTRA_BITS, MAX_INTERNAL_BITS)


def scale_and_shift(value: Encrypted, gain: Any, offset: Any) -> Encrypted:
    """value * gain + offset for constant (broadcastable) gain/offset: leveled when possible."""
    if value.affine and np.all(np.asarray(gain) != 0):
        scale = value.scale * gain
        return Encrypted(value.expr, scale, value.zero_point - offset / scale)
    float_fn = value.value_fn()
    gain_t, offset_t = torch.as_tensor(gain), torch.as_tensor(offset)
    return Encrypted(value.expr, fn=lambda q: float_fn(q) * gain_t + offset_t, positional=True)


def _constants_reason(node: fx.Node, indices) -> Optional[str]:
    for index in indices:
        arg = node.args[index] if len(node.args) > index else None
        if arg is not None and not is_constant(arg):
            return f"{op_name(node)} with encrypted parameters has no FHE lowering"
    return None


# ---- batch norm ---------------------------------------------------------------------------


def _batch_norm_reason(node: fx.Node) -> Optional[str]:
    return _constants_reason(node, (1, 2, 3, 4))


@register(aten._native_batch_norm_legit_no_training.default, validator=_batch_norm_reason)
def batch_norm(ctx: LoweringContext, x, weight, bias, running_mean, running_var, momentum, eps):
    """BatchNorm1d/2d/3d in eval mode: a per-channel affine map (leveled)."""
    mean, var = constant_array(running_mean), constant_array(running_var)
    gain = 1.0 / np.sqrt(var + eps)
    if weight is not None:
        gain = gain * constant_array(weight)
    offset = -mean * gain + (constant_array(bias) if bias is not None else 0.0)
    channel_shape = (-1,) + (1,) * (len(shape_of(x.expr)) - 2)
    return scale_and_shift(x, gain.reshape(channel_shape), offset.reshape(channel_shape)), None, None


# ---- layer norm ---------------------------------------------------------------------------


def _layer_norm_reason(node: fx.Node) -> Optional[str]:
    shape = meta_shape(node.args[0])
    normalized = list(node.args[1])
    if shape is not None and len(normalized) >= len(shape):
        return f"{op_name(node)} over dim 0 (the batch); {ONE_SAMPLE_AT_A_TIME}"
    return _constants_reason(node, (2, 3))


@register(aten.native_layer_norm.default, validator=_layer_norm_reason)
def layer_norm(ctx: LoweringContext, x, normalized_shape, weight, bias, eps):
    """LayerNorm over the trailing dims (see the module docstring)."""
    x = ctx.as_linear_input(x, stats=ctx.input_stats(0))
    ndim = len(shape_of(x.expr))
    axes = list(range(ndim - len(normalized_shape), ndim))
    count = int(np.prod([shape_of(x.expr)[a] for a in axes]))
    bits = internal_bits(ctx)
    # count * (x - mean) / scale, exactly, in integers
    centered_q = x.centered * count - np.sum(x.centered, axis=tuple(axes), keepdims=True)
    exact = Encrypted(centered_q, x.scale / count, 0.0)
    centered = ctx.materialize(exact, bits, observed_stats(ctx, "centered", exact))
    square = with_value(centered, fn=lambda q, f=centered.value_fn(): f(q) ** 2)
    squares = ctx.materialize(square, bits, observed_stats(ctx, "square", square))
    variance = reduce_sum(ctx, squares, axes, True, mean=True)
    variance_fn = variance.value_fn()
    inverse_std = Encrypted(
        variance.expr, fn=lambda q: torch.rsqrt(torch.clamp(variance_fn(q), min=0.0) + eps)
    )
    # rows whose centered values all round to 0 give 0 whatever the rsqrt: leave them out of
    # the rsqrt's range (a non-finite value is not observed)
    observed = Encrypted(
        variance.expr,
        fn=lambda q: torch.where(
            variance_fn(q) > 0, torch.rsqrt(torch.clamp(variance_fn(q), min=0.0) + eps), torch.nan
        ),
    )
    inverse_std = ctx.materialize(inverse_std, bits, observed_stats(ctx, "inverse_std", observed))
    normalized = multiply(ctx, centered, inverse_std)
    trailing = tuple(normalized_shape)
    gain = constant_array(weight).reshape(trailing) if weight is not None else np.ones(trailing)
    offset = constant_array(bias).reshape(trailing) if bias is not None else np.zeros(trailing)
    return scale_and_shift(normalized, gain, offset), None, None


# ---- softmax ------------------------------------------------------------------------------


def _softmax_reason(node: fx.Node) -> Optional[str]:
    return batch_dim_reason(node.args[1], node, "dim")


def _shifted_exponent(ctx: LoweringContext, x, dim: int):
    """(x - max(x) as an exact affine value, exp(x - max(x)) as fresh values in [0, 1], axis)."""
    x = ctx.as_linear_input(x)
    axis = dim % len(shape_of(x.expr))
    peak = reduce_extreme(ctx, x, [axis], True, largest=True)
    shifted = Encrypted(x.expr - peak.expr, x.scale, 0.0)
    exponent = with_value(shifted, fn=lambda q, f=shifted.value_fn(): torch.exp(f(q)))
    return shifted, ctx.materialize(exponent, internal_bits(ctx), NodeStats(0.0, 1.0, ())), axis


@register(aten._softmax.default, aten._safe_softmax.default, validator=_softmax_reason)
def softmax(ctx: LoweringContext, x, dim, half_to_float=False):
    """Softmax over a non-batch dim (see the module docstring); _safe_softmax is the same on
    finite inputs (masks with -inf are rewritten by the masked_softmax pass)."""
    _, exponent, axis = _shifted_exponent(ctx, x, dim)
    count = shape_of(exponent.expr)[axis]
    total = reduce_sum(ctx, exponent, [axis], True, mean=False)
    inverse = ctx.materialize(reciprocal(ctx, total), internal_bits(ctx), NodeStats(1.0 / count, 1.0, ()))
    return multiply(ctx, exponent, inverse)


@register(aten._log_softmax.default, validator=_softmax_reason)
def log_softmax(ctx: LoweringContext, x, dim, half_to_float=False):
    """LogSoftmax = (x - max) - log(sum(exp(x - max))): one more lookup, one subtraction."""
    shifted, exponent, axis = _shifted_exponent(ctx, x, dim)
    total = reduce_sum(ctx, exponent, [axis], True, mean=False)
    log_total = with_value(total, fn=lambda q, f=total.value_fn(): torch.log(torch.clamp(f(q), min=1e-12)))
    log_total = ctx.materialize(log_total, stats=observed_stats(ctx, "log_total", log_total))
    return combine(ctx, shifted, log_total, -1)


# ---- vector norms -------------------------------------------------------------------------


def _vector_norm_reason(node: fx.Node) -> Optional[str]:
    order = node.args[1] if len(node.args) > 1 else node.kwargs.get("ord", 2)
    if not (isinstance(order, (int, float)) and (order > 0)):
        return f"{op_name(node)} with ord={order!r} has no FHE lowering (ord > 0 or inf do)"
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    return batch_dim_reason(dims, node)


@register(aten.linalg_vector_norm.default, validator=_vector_norm_reason)
def vector_norm(ctx: LoweringContext, x, ord=2, dim=None, keepdim=False, dtype=None):
    """torch.linalg.vector_norm / ReduceL2 over non-batch dims (see the module docstring)."""
    dims = [dim] if isinstance(dim, int) else list(dim)
    value_fn = x.value_fn()
    magnitude = (
        with_value(x, fn=lambda q: value_fn(q).abs())
        if x.affine
        else Encrypted(x.expr, fn=lambda q: value_fn(q).abs(), positional=x.positional)
    )
    if math.isinf(ord):
        magnitude = ctx.materialize(magnitude, stats=observed_stats(ctx, "magnitude", magnitude))
        return reduce_extreme(ctx, magnitude, dims, keepdim, largest=True)
    magnitude_fn = magnitude.value_fn()
    power = Encrypted(magnitude.expr, fn=lambda q: magnitude_fn(q) ** ord, positional=magnitude.positional)
    powers = ctx.materialize(power, stats=observed_stats(ctx, "power", power))
    total = reduce_sum(ctx, powers, dims, keepdim, mean=False)
    return with_value(total, fn=lambda q, f=total.value_fn(): torch.clamp(f(q), min=0.0) ** (1.0 / ord))
