"""Element-wise ops: fused into pending table lookups, or kept leveled when affine.

Any ATen op tagged pointwise whose encrypted operands all derive from one integer expression
is folded into that expression's pending function (evaluated with torch itself, so every
activation has exact torch semantics). Adding or multiplying an affine value by a constant only
changes its scale/zero-point. Two independently encrypted operands are supported for add, sub
(scales aligned with at most one lookup) and mul (encrypted multiplication).
"""

from __future__ import annotations

from typing import Any, List, Optional

import numpy as np
import torch
import torch.fx as fx

from ..errors import LoweringError
from ..quantization.program import Encrypted, LoweringContext, is_encrypted, with_value, shape_of
from .registry import is_constant, is_pointwise, op_name, register, register_pointwise

aten = torch.ops.aten

ADD = {aten.add.Tensor, aten.add.Scalar}
SUB = {aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor}
MUL = {aten.mul.Tensor, aten.mul.Scalar}
DIV = {aten.div.Tensor, aten.div.Scalar}
TWO_ENCRYPTED = ADD | SUB | MUL


def _root(arg: fx.Node) -> fx.Node:
    """The node an element-wise chain starts from (through single-encrypted-input pointwise ops)."""
    node = arg
    while node.op == "call_function" and (is_pointwise(node.target) or node.target in CASTS):
        encrypted = [a for a in node.all_input_nodes if not is_constant(a)]
        roots = {_root(a) for a in encrypted}
        if len(roots) != 1:
            return node
        node = next(iter(roots))
    return node


def pointwise_reason(node: fx.Node) -> Optional[str]:
    """Element-wise ops of several independently encrypted tensors: only add, sub and mul."""
    encrypted = [a for a in node.all_input_nodes if not is_constant(a)]
    if len({_root(a) for a in encrypted}) <= 1 or node.target in TWO_ENCRYPTED:
        return None
    return (f"{op_name(node)} of two independently encrypted tensors has no FHE lowering "
            "(only add, sub and mul do)")


def _torch_constant(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(torch.float64)
    return value


def _numpy_constant(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        array = value.detach().to(torch.float64).numpy()
        return float(array) if array.ndim == 0 else array
    return float(value)


def _shape(value: Any) -> tuple:
    if is_encrypted(value):
        return tuple(shape_of(value.expr))
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def fold(ctx: LoweringContext, args: tuple, kwargs: dict, apply=None) -> Encrypted:
    """Compose the op into the pending function of the operands' shared integer expression."""
    op = apply or ctx.node.target
    encrypted = [a for a in args if is_encrypted(a)]
    base = encrypted[0]
    out_shape = np.broadcast_shapes(*(_shape(a) for a in args))
    expr = base.expr
    if tuple(shape_of(expr)) != tuple(out_shape):
        expr = expr + np.zeros(out_shape[1:], dtype=np.int64)
    value_fns = [a.value_fn() if is_encrypted(a) else None for a in args]
    constants = [_torch_constant(a) for a in args]
    kwargs = {k: _torch_constant(v) for k, v in kwargs.items()}

    def fn(q):
        operands = [f(q) if f is not None else c for f, c in zip(value_fns, constants)]
        return op(*operands, **kwargs)

    positional = any(a.positional or not a.uniform and a.fn is None for a in encrypted) or any(
        isinstance(a, torch.Tensor) and a.numel() > 1 for a in args)
    return Encrypted(expr, fn=fn, positional=positional)


def _affine(ctx: LoweringContext, args: tuple, kwargs: dict) -> Optional[Encrypted]:
    """Leveled update of scale/zero-point for (affine value) op (constant); None if not one."""
    op = ctx.node.target
    if len(args) != 2 or set(kwargs) - {"alpha"} or op not in ADD | SUB | MUL | DIV:
        return None
    x, c = args
    swapped = not is_encrypted(x)
    if swapped:
        x, c = c, x
    if not (is_encrypted(x) and x.affine and not is_encrypted(c)):
        return None
    if _shape(c) and len(_shape(c)) > len(shape_of(x.expr)) or np.broadcast_shapes(
            _shape(c), shape_of(x.expr)) != shape_of(x.expr):
        return None
    if float(kwargs.get("alpha", 1)) != 1:
        return None
    c = _numpy_constant(c)
    if op in ADD:
        return with_value(x, zero_point=x.zero_point - c / x.scale, fresh=False)
    if op in SUB:
        if swapped != (op in {aten.rsub.Scalar, aten.rsub.Tensor}):
            # c - s(q - z) = -s (q - (z + c/s))
            return with_value(x, scale=-x.scale, zero_point=x.zero_point + c / x.scale, fresh=False)
        return with_value(x, zero_point=x.zero_point + c / x.scale, fresh=False)
    if np.any(c == 0) or (op in DIV and swapped):
        return None
    scale = x.scale * c if op in MUL else x.scale / c
    return with_value(x, scale=scale, fresh=x.fresh and np.ndim(scale) == 0)


def pointwise(ctx: LoweringContext, *args, **kwargs):
    """Generic lowering of a pointwise op (see the module docstring)."""
    encrypted = [a for a in args if is_encrypted(a)]
    if not encrypted:
        return ctx.node.target(*args, **kwargs)
    if len({id(a.expr) for a in encrypted}) == 1:
        return _affine(ctx, args, kwargs) or fold(ctx, args, kwargs)
    return _two_encrypted(ctx, args, kwargs)


def _two_encrypted(ctx: LoweringContext, args: tuple, kwargs: dict) -> Encrypted:
    op = ctx.node.target
    if len(args) != 2 or not all(is_encrypted(a) for a in args):
        raise LoweringError(f"{op_name(ctx.node)}: unsupported mix of encrypted operands")
    a, b = args
    if op in MUL:
        a, b = ctx.as_linear_input(a), ctx.as_linear_input(b)
        return Encrypted(a.centered * b.centered, a.scale * b.scale, 0.0)
    alpha = float(kwargs.get("alpha", 1))
    sign = -alpha if op in SUB else alpha
    if op in {aten.rsub.Tensor}:
        a, b = b, a
    a, b = (v if v.affine else ctx.materialize(v) for v in (a, b))
    if alpha != 1:
        b = with_value(b, scale=b.scale * abs(alpha))
        sign = np.sign(sign)
    return add_aligned(ctx, a, b, sign)


def add_aligned(ctx: LoweringContext, a: Encrypted, b: Encrypted, sign: float) -> Encrypted:
    """a + sign * b for affine values: leveled when scales match, else one lookup on the finer."""
    scales_match = np.shape(a.scale) == np.shape(b.scale) and np.allclose(a.scale, b.scale)
    if not scales_match:
        if np.max(np.abs(a.scale)) >= np.max(np.abs(b.scale)):
            b = ctx.rescale(b, a.scale)
        else:
            a = ctx.rescale(a, b.scale)
    expr = a.expr + b.expr if sign > 0 else a.expr - b.expr
    zero_point = a.zero_point + b.zero_point if sign > 0 else a.zero_point - b.zero_point
    return Encrypted(expr, a.scale, zero_point)


register_pointwise(pointwise, pointwise_reason)

CASTS = {aten._to_copy.default, aten.clone.default, aten.alias.default, aten.detach.default,
         aten.lift_fresh_copy.default}


def _cast_reason(node: fx.Node) -> Optional[str]:
    device = node.kwargs.get("device")
    if device is not None and torch.device(device).type != "cpu":
        return f"{op_name(node)} moves data to {device}"
    return None


@register(*CASTS, validator=_cast_reason)
def cast(ctx: LoweringContext, x, *args, **kwargs):
    """Tensor.to(dtype), clone, alias: identity on the encrypted value, or folded dtype cast."""
    if not is_encrypted(x):
        return ctx.node.target(x, *args, **kwargs)
    dtype = kwargs.get("dtype")
    if dtype is None or dtype.is_floating_point:
        return x
    return fold(ctx, (x,), {}, apply=lambda v: v.to(dtype).to(torch.float64))
