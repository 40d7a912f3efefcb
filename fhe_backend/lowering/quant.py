"""Fake quantization from quantization-aware training: the `fhe::fake_quant` op and its lowering.

``fake_quant(x, scale, zero_point, qmin, qmax) = (clamp(round(x / scale + zero_point), qmin,
qmax) - zero_point) * scale`` is the quantizer of Brevitas and of generic QAT models. The QAT
module pass (`fhe_backend.qat`) and the `detect_fake_quant` graph pass put it in the graph; its
lowering materializes the value with exactly that quantizer (one table lookup whose output
integers are the QAT integers), so learned scales, zero-points and bit-widths are used as they
are instead of being re-calibrated. A partition input read only through a fake-quant is
quantized with that quantizer directly (no lookup at all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.fx as fx

from ..graph_utils import fetch_attr
from ..quantization.quantizers import UniformQuantizer
from .context import Encrypted, LoweringContext, is_encrypted
from .elementwise import fold
from .registry import is_constant, op_name, register


@torch.library.custom_op("fhe::fake_quant", mutates_args=())
def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: float, qmax: float
) -> torch.Tensor:
    """Uniform fake quantization: round to the integer grid of `scale`, clamp, dequantize."""
    q = torch.clamp(torch.round(x / scale + zero_point), qmin, qmax)
    return ((q - zero_point) * scale).to(x.dtype)


@fake_quant.register_fake
def _fake_quant_shape(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x)


def _fake_quant_backward(ctx, grad):
    # straight-through estimator, zero outside the clamping range (as Brevitas trains)
    x, scale, zero_point = ctx.saved_tensors
    q = x / scale + zero_point
    inside = (q >= ctx.qmin - 0.5) & (q <= ctx.qmax + 0.5)
    return grad * inside, None, None, None, None


def _save_for_backward(ctx, inputs, output):
    x, scale, zero_point, qmin, qmax = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.qmin, ctx.qmax = qmin, qmax


fake_quant.register_autograd(_fake_quant_backward, setup_context=_save_for_backward)

FAKE_QUANT = torch.ops.fhe.fake_quant.default


@dataclass(frozen=True)
class FakeQuantSpec:
    """The constant parameters of one fake-quant node."""

    scale: float
    zero_point: float
    qmin: int
    qmax: int

    @property
    def n_bits(self) -> int:
        """Bits of the integer range [qmin, qmax]."""
        return max(1, math.ceil(math.log2(self.qmax - self.qmin + 1)))

    def quantize(self, values: Any) -> np.ndarray:
        """Float values -> the QAT integers in [qmin, qmax], rounded as `fake_quant` rounds them
        in the model's float32 (a tie there may not be one in float64)."""
        scaled = np.asarray(values, dtype=np.float32) / np.float32(self.scale)
        q = np.rint(scaled + np.float32(self.zero_point))
        return np.clip(q, self.qmin, self.qmax).astype(np.int64)

    def input_quantizer(self) -> UniformQuantizer:
        """The same quantizer as an unsigned `UniformQuantizer` (integers shifted by -qmin, up
        to qmax - qmin: a narrow range is clamped by the client, not by a lookup), rounding as
        `fake_quant` does on the model's float32 inputs."""
        levels = self.qmax - self.qmin
        return UniformQuantizer(
            self.scale,
            self.zero_point - self.qmin,
            self.n_bits,
            None if levels == 2**self.n_bits - 1 else levels,
            model_zero_point=self.zero_point,
        )


def _scalar(value: Any) -> Optional[float]:
    if isinstance(value, torch.Tensor):
        return float(value) if value.numel() == 1 else None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def constant_value(graph_module: fx.GraphModule, arg: Any) -> Any:
    """The value of a get_attr node (or the argument itself when it is not a node)."""
    return fetch_attr(graph_module, arg.target) if isinstance(arg, fx.Node) else arg


def fake_quant_spec(node: fx.Node, values: Optional[tuple] = None) -> Optional[FakeQuantSpec]:
    """The spec of a fake-quant node with per-tensor constant parameters, else None.

    `values` are the node's evaluated (scale, zero_point) when known; otherwise they are read
    from the node's graph constants.
    """
    if node.op != "call_function" or node.target != FAKE_QUANT:
        return None
    _, scale, zero_point, qmin, qmax = node.args
    if values is None:
        if not (is_constant(scale) and is_constant(zero_point)):
            return None
        graph_module = node.graph.owning_module
        values = (constant_value(graph_module, scale), constant_value(graph_module, zero_point))
    scale, zero_point = (_scalar(v) for v in values)
    if scale is None or zero_point is None or scale <= 0 or zero_point != round(zero_point):
        return None
    return FakeQuantSpec(scale, zero_point, int(qmin), int(qmax))


def _reason(node: fx.Node) -> Optional[str]:
    if not (is_constant(node.args[1]) and is_constant(node.args[2])):
        return f"{op_name(node)} with an encrypted scale or zero-point has no FHE lowering"
    return None


def _already_on_grid(value: Encrypted, spec: FakeQuantSpec, ctx: LoweringContext) -> bool:
    """True when `value` is a partition input quantized with `spec` (no lookup needed)."""
    if not (value.fresh and value.uniform) or not np.isclose(float(value.scale), spec.scale):
        return False
    for quantizer in ctx.program.input_quantizers:
        if (float(quantizer.scale), float(quantizer.zero_point)) != (
            float(value.scale),
            float(value.zero_point),
        ):
            continue
        offset = float(quantizer.zero_point) - spec.zero_point  # QAT integer = q - offset
        return offset == round(offset) and -offset >= spec.qmin and quantizer.q_max - offset <= spec.qmax
    return False


@register(FAKE_QUANT, validator=_reason)
def lower_fake_quant(ctx: LoweringContext, x, scale, zero_point, qmin, qmax):
    """Materialize `x` on the QAT grid: one lookup whose outputs are the QAT integers."""
    if not is_encrypted(x):
        return ctx.node.target(x, scale, zero_point, qmin, qmax)
    spec = fake_quant_spec(ctx.node, (scale, zero_point))
    if spec is None:
        return _lookup_with_tensors(ctx, x, scale, zero_point, qmin, qmax)
    if _already_on_grid(x, spec, ctx):
        return x
    float_fn = x.value_fn()
    expr = ctx.lookup(x.expr, lambda q: spec.quantize(float_fn(q).numpy()))
    return Encrypted(expr, spec.scale, spec.zero_point, fresh=True)


def _lookup_with_tensors(ctx: LoweringContext, x, scale, zero_point, qmin, qmax) -> Encrypted:
    """Per-channel fake-quant: one lookup to the dequantized value, requantized by calibration."""
    return ctx.materialize(fold(ctx, (x, scale, zero_point, qmin, qmax), {}))
