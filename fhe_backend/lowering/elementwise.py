"""Element-wise ops: fused into pending table lookups, or kept leveled when affine.

Any ATen op tagged pointwise whose encrypted operands all derive from one integer expression
is folded into that expression's pending function (evaluated with torch itself, so every
activation has exact torch semantics). Adding or multiplying an affine value by a constant only
changes its scale/zero-point. Two independently encrypted operands are supported for add, sub
(scales aligned with at most one lookup), mul (encrypted multiplication), div (a reciprocal
lookup, then a multiplication), comparisons (through their difference: gt(a, b) = gt(a - b, 0)),
maximum/minimum (b + relu(a - b)) and where (b + cond * (a - b)).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.fx as fx

from ..errors import LoweringError
from ..quantization.calibration import NodeStats, tensor_stats
from .context import Encrypted, LoweringContext, constant_array, is_encrypted, shape_of, with_value
from .registry import is_constant, is_pointwise, meta_shape, op_name, register, register_pointwise

aten = torch.ops.aten

ADD = {aten.add.Tensor, aten.add.Scalar}
SUB = {aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor}
MUL = {aten.mul.Tensor, aten.mul.Scalar}
DIV = {aten.div.Tensor, aten.div.Scalar}
COMPARISONS = {aten.gt.Tensor, aten.ge.Tensor, aten.lt.Tensor, aten.le.Tensor, aten.eq.Tensor, aten.ne.Tensor}
EXTREMA = {aten.maximum.default, aten.minimum.default}
WHERE = {aten.where.self}
TWO_ENCRYPTED = ADD | SUB | MUL | DIV | COMPARISONS | EXTREMA


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
    """Element-wise ops of several independently encrypted tensors: only the TWO_ENCRYPTED ones
    and where; an encrypted operand must not broadcast along dim 0 (the batch)."""
    encrypted = [a for a in node.all_input_nodes if not is_constant(a)]
    out_shape = meta_shape(node)
    for operand in encrypted:
        shape = meta_shape(operand)
        if (
            shape is not None
            and out_shape is not None
            and len(shape) == len(out_shape)
            and shape
            and shape[0] != out_shape[0]
        ):
            return (
                f"{op_name(node)} broadcasts an operand of shape {tuple(shape)} along dim 0 "
                "(the batch): an encrypted value shared by every sample"
            )
    if len({_root(a) for a in encrypted}) <= 1:
        return None
    if (
        node.target in TWO_ENCRYPTED
        and len(node.args) == 2
        and all(isinstance(a, fx.Node) for a in node.args)
    ):
        return None
    if node.target in WHERE and isinstance(node.args[0], fx.Node) and not is_constant(node.args[0]):
        return None
    return (
        f"{op_name(node)} of several independently encrypted tensors has no FHE lowering "
        "(add, sub, mul, div, comparisons, maximum, minimum and where with an encrypted "
        "condition do)"
    )


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
        isinstance(a, torch.Tensor) and a.numel() > 1 for a in args
    )
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
    if (
        _shape(c)
        and len(_shape(c)) > len(shape_of(x.expr))
        or np.broadcast_shapes(_shape(c), shape_of(x.expr)) != shape_of(x.expr)
    ):
        return None
    if float(kwargs.get("alpha", 1)) != 1:
        return None
    c = _numpy_constant(c)
    if np.ndim(c) and np.all(c == np.ravel(c)[0]):
        c = float(np.ravel(c)[0])  # a constant filled with one value (full_like) acts as a scalar
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
        return _affine(ctx, args, kwargs) or _masked(ctx, args) or fold(ctx, args, kwargs)
    return _two_encrypted(ctx, args, kwargs)


def _masked(ctx: LoweringContext, args: tuple) -> Optional[Encrypted]:
    """where(constant condition, affine value, constant) (or the value second): leveled. The
    integers are multiplied by the 0/1 mask and the zero-point of the other positions set so
    that their 0 decodes to the constant, where a table lookup per position of the value's full
    width would be needed otherwise. None if not that pattern."""
    if ctx.node.target not in WHERE or len(args) != 3 or is_encrypted(args[0]):
        return None
    condition, a, b = args
    value, other, keep = (a, b, True) if is_encrypted(a) else (b, a, False)
    if not (value.affine and not is_encrypted(other)):
        return None
    shape = tuple(shape_of(value.expr))
    if np.broadcast_shapes(_shape(condition), _shape(other), shape) != shape:
        return None  # the result would be larger than the encrypted value
    mask = constant_array(condition).astype(bool)
    mask = mask if keep else ~mask
    constant = _numpy_constant(other)
    return with_value(
        value,
        expr=value.expr * mask.astype(np.int64),
        zero_point=np.where(mask, value.zero_point, -np.asarray(constant) / value.scale),
        fresh=False,
    )


def _two_encrypted(ctx: LoweringContext, args: tuple, kwargs: dict) -> Encrypted:
    op = ctx.node.target
    if op in WHERE:
        return select(ctx, *args)
    if len(args) != 2 or not all(is_encrypted(a) for a in args):
        raise LoweringError(f"{op_name(ctx.node)}: unsupported mix of encrypted operands")
    a, b = args
    if op in MUL:
        return multiply(ctx, a, b)
    if op in DIV:
        inverse = reciprocal(ctx, b)
        return multiply(ctx, a, inverse, b_stats=observed_stats(ctx, "reciprocal", inverse))
    if op in COMPARISONS:
        difference = combine(ctx, a, b, -1)
        return fold(ctx, (difference,), {}, apply=lambda d: op(d, torch.zeros((), dtype=d.dtype)))
    if op in EXTREMA:
        return extremum(ctx, a, b, largest=op is aten.maximum.default)
    alpha = float(kwargs.get("alpha", 1))
    sign = -alpha if op in SUB else alpha
    if op in {aten.rsub.Tensor}:
        a, b = b, a
    if alpha != 1:
        b = affine(ctx, b)
        b = with_value(b, scale=b.scale * abs(alpha))
        sign = np.sign(sign)
    return combine(ctx, a, b, sign)


def affine(ctx: LoweringContext, value: Encrypted) -> Encrypted:
    """`value` with no pending function (one lookup when one is pending)."""
    return value if value.affine else ctx.materialize(value)


def combine(ctx: LoweringContext, a: Encrypted, b: Encrypted, sign: float) -> Encrypted:
    """a + sign * b for any two encrypted values (pending functions are materialized first)."""
    return add_aligned(ctx, affine(ctx, a), affine(ctx, b), sign)


def align(ctx: LoweringContext, a: Encrypted, b: Encrypted):
    """Affine a and b on one scale: the finer one is rescaled to the coarser (one lookup)."""
    scales_match = np.shape(a.scale) == np.shape(b.scale) and np.allclose(a.scale, b.scale)
    if not scales_match:
        if np.max(np.abs(a.scale)) >= np.max(np.abs(b.scale)):
            b = ctx.rescale(b, a.scale)
        else:
            a = ctx.rescale(a, b.scale)
    return a, b


def add_aligned(ctx: LoweringContext, a: Encrypted, b: Encrypted, sign: float) -> Encrypted:
    """a + sign * b for affine values: leveled when scales match, else one lookup on the finer."""
    a, b = align(ctx, a, b)
    expr = a.expr + b.expr if sign > 0 else a.expr - b.expr
    zero_point = a.zero_point + b.zero_point if sign > 0 else a.zero_point - b.zero_point
    return Encrypted(expr, a.scale, zero_point)


def extremum(ctx: LoweringContext, a: Encrypted, b: Encrypted, largest: bool) -> Encrypted:
    """maximum(a, b) = b + relu(a - b), minimum(a, b) = a - relu(a - b): one lookup on a - b."""
    a, b = align(ctx, affine(ctx, a), affine(ctx, b))
    difference = add_aligned(ctx, a, b, -1)
    relu = with_value(difference, fn=lambda q, f=difference.value_fn(): torch.relu(f(q)))
    positive_part = ctx.rescale(relu, difference.scale)
    return add_aligned(ctx, b if largest else a, positive_part, 1 if largest else -1)


def select(ctx: LoweringContext, condition: Any, a: Any, b: Any) -> Encrypted:
    """where(condition, a, b) = b + condition * (a - b), condition encrypted (an encrypted mul)."""
    if not is_encrypted(condition):
        raise LoweringError(f"{op_name(ctx.node)}: a constant condition over encrypted values is not lowered")
    mask = with_value(condition, fn=lambda q, f=condition.value_fn(): f(q).to(torch.float64))
    mask = ctx.materialize(mask, n_bits=1, stats=NodeStats(0.0, 1.0, ()))
    if is_encrypted(b):
        base = affine(ctx, b)
        delta = (
            combine(ctx, a, b, -1)
            if is_encrypted(a)
            else shift(with_value(base, scale=-base.scale), float(_numpy_constant(a)))
        )
    else:
        base = None
        delta = shift(affine(ctx, a), -float(_numpy_constant(b)))
    product = multiply(ctx, mask, delta, b_stats=observed_stats(ctx, "where-delta", delta))
    if base is None:
        return shift(product, float(_numpy_constant(b)))
    return add_aligned(ctx, base, product, 1)


def shift(value: Encrypted, constant: float) -> Encrypted:
    """value + constant for an affine value: only its zero-point changes."""
    return with_value(value, zero_point=value.zero_point - constant / value.scale, fresh=False)


def multiply(
    ctx: LoweringContext,
    a: Encrypted,
    b: Encrypted,
    a_stats: Optional[NodeStats] = None,
    b_stats: Optional[NodeStats] = None,
) -> Encrypted:
    """a * b of two encrypted values (broadcasting): an encrypted multiplication of fresh values.

    `a_stats`/`b_stats` give the float range of an operand that must be requantized and that is
    not a node's output (an intermediate value of a lowering).
    """
    a, b = ctx.as_linear_input(a, stats=a_stats), ctx.as_linear_input(b, stats=b_stats)
    if is_clear(a.expr):
        a, b = b, a
    if is_clear(b.expr):  # Concrete has no clear-clear ops: expand (q_b - z_b) around the product
        zero_point = int(np.rint(b.zero_point))
        product = a.centered * b.expr
        return Encrypted(product - a.centered * zero_point if zero_point else product, a.scale * b.scale, 0.0)
    return Encrypted(signed_product(ctx, a.centered, b.centered, matmul=False), a.scale * b.scale, 0.0)


def signed_product(ctx: LoweringContext, a: Any, b: Any, matmul: bool) -> Any:
    """a * b (or a @ b with `matmul`) of two encrypted integer tensors.

    Concrete 2.11 miscomputes the product of a signed and an unsigned encrypted tensor (in
    simulation and execution; an attention's softmax @ values too), so one operand is shifted
    first: the signed one to non-negative values (a * b = a * (b + k) - k * a) or the
    non-negative one to a signed range (a * b = (a - k) * b + k * b). The correction term k * x
    is an exact table lookup on x, not a leveled multiplication: a leveled one would give x, an
    operand of the product, the product's bit-width (Concrete's operands of an encrypted
    multiplication share one precision, and an addition shares its operands' precision), so the
    multiplication's internal lookups would be as wide as its result (e.g. 12 bits instead of 7
    in a LayerNorm). The operand with fewer elements carries the correction; for a matmul it is
    summed over the contracted dimension (a's last, b's second to last).
    """
    count = next(ctx.products)
    ranges = [observed_integers(ctx, f"product{count}:{side}", v) for side, v in (("a", a), ("b", b))]
    signed = [r.low < 0 for r in ranges]
    if signed[0] == signed[1]:
        return a @ b if matmul else a * b
    operands = [a, b]
    unsigned = 0 if signed[1] else 1  # the non-negative operand's position

    def product(first: Any, second: Any) -> Any:
        return first @ second if matmul else first * second

    def correction(position: int, factor: int) -> Any:
        term = ctx.lookup(operands[position], lambda q: factor * np.asarray(q), exact=True)
        if not matmul:
            return term
        axis = -1 if position == 0 or len(shape_of(term)) == 1 else -2
        return np.sum(term, axis=axis, keepdims=True)

    sizes = [int(np.prod(shape_of(v))) for v in operands]
    if sizes[unsigned] <= sizes[1 - unsigned]:
        moved, by = 1 - unsigned, -int(ranges[1 - unsigned].low)  # the signed one up to >= 0
    else:
        moved, by = unsigned, -(int(ranges[unsigned].low) + 1)  # the non-negative one down to -1
    # x * (y + by) = x * y + by * x: the other operand carries the correction -by * x
    shifted = list(operands)
    shifted[moved] = operands[moved] + by
    return product(*shifted) + correction(1 - moved, -by)


def is_clear(expr: Any) -> bool:
    """True for a traced circuit value that is a clear (unencrypted) input."""
    output = getattr(expr, "output", None)
    return output is not None and not getattr(output, "is_encrypted", True)


def reciprocal(ctx: LoweringContext, value: Encrypted) -> Encrypted:
    """1 / value as a pending function (non-finite results at 0 are clipped when materialized)."""
    float_fn = value.value_fn()
    return Encrypted(
        value.expr,
        fn=lambda q: _finite(1.0 / float_fn(q).to(torch.float64)),
        positional=value.positional or not value.uniform,
    )


LARGE = 1e12  # stands for infinity in tables (clipped by the quantizer)


def _finite(values: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(values, nan=0.0, posinf=LARGE, neginf=-LARGE)


def observed_stats(ctx: LoweringContext, key: str, value: Encrypted) -> NodeStats:
    """The float range of an intermediate value of a lowering, measured on the inputset.

    The program's first run is on the whole quantized inputset (`calibrate_rounding`): there the
    value is concrete and its range is recorded; later runs (circuit tracing, execution) reuse it.
    """

    def measure() -> NodeStats:
        floats = value.value_fn()(value.expr)
        return tensor_stats(floats[torch.isfinite(floats)] if floats.is_floating_point() else floats)

    return _observed(ctx, key, value.expr, measure)


def observed_integers(ctx: LoweringContext, key: str, expr: Any) -> NodeStats:
    """The range of an integer expression inside a lowering, measured like `observed_stats`."""
    return _observed(ctx, key, expr, lambda: tensor_stats(torch.from_numpy(np.asarray(expr))))


def _observed(ctx: LoweringContext, key: str, expr: Any, measure) -> NodeStats:
    store = ctx.program.constants
    full_key = (ctx.node.name, f"observed:{key}")
    if ctx.program.recording is not None and isinstance(expr, np.ndarray):
        new = measure()
        store[full_key] = store[full_key].merge(new) if full_key in store else new
    if full_key not in store:
        raise LoweringError(
            f"node '{ctx.node.name}': the range of its intermediate value '{key}' "
            "was not calibrated; compile the model with an inputset first"
        )
    return store[full_key]


register_pointwise(pointwise, pointwise_reason)

CASTS = {
    aten._to_copy.default,
    aten.clone.default,
    aten.alias.default,
    aten.detach.default,
    aten.lift_fresh_copy.default,
}


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
