"""Where each value keeps the batch: per-op batch rules, decided from traced shapes.

A circuit runs one sample at a time, so every value inside an FHE partition must hold the
samples apart: its elements for sample b must be a fixed slice of it. The batch may sit in any
dim, and share it with other factors: MultiheadAttention turns (batch, seq, d) into
(seq, batch, d), then (seq, batch * heads, d / heads) and (seq * batch, d). `BatchAt(dim,
outer)` says that dim `dim` is `outer * batch * inner` in row-major order: it holds the batch,
with `outer` positions before it in that dim (1 when the batch is the dim's outermost factor).
A partition's inputs and outputs must have the batch at dim 0 with `outer == 1` (batch-major),
the layout the runtime splits into samples.

Each op has a batch rule `rule(node, layouts) -> BatchAt | MixesSamples`, where `layouts` maps
the node's batch-holding tensor inputs to their layouts (clear constants are left out). A
lowering declares its rule with `register(..., batch=rule)`; the rules of the data-movement,
matmul, convolution, pooling, LayerNorm and embedding lowerings are declared here per ATen op
(`batch_rule`); other ops follow `_generic_rule`, which reads the op's schema (its `dim`/`keepdim` arguments) and the
traced shapes (`meta["val"]`). An op with no lowering that changes its input's batch dim mixes
samples. No decision reads the text of an unsupported-op reason.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.fx as fx

from .registry import ONE_SAMPLE_AT_A_TIME, declared_batch_rule, has_lowering, op_name

aten = torch.ops.aten


@dataclass(frozen=True)
class BatchAt:
    """The batch lives in dim `dim`, after `outer` positions of that dim (row-major)."""

    dim: int
    outer: Any = 1

    @property
    def major(self) -> bool:
        """True for the layout the runtime splits into samples: dim 0, batch outermost."""
        return self.dim == 0 and self.outer == 1

    def __str__(self) -> str:
        return f"dim {self.dim}" if self.outer == 1 else f"dim {self.dim} (after {self.outer} positions)"


@dataclass(frozen=True)
class MixesSamples:
    """A structured verdict: the op combines (or cannot keep apart) the samples of the batch."""

    why: str

    def reason(self, node: fx.Node) -> str:
        """The sentence the partition report shows for the node."""
        return f"{op_name(node)} {self.why}; {ONE_SAMPLE_AT_A_TIME}"


@dataclass(frozen=True)
class SizedConstant(BatchAt):
    """A value computed from constants and the symbolic batch size (e.g. a buffer expanded to
    (batch, seq)): the same for every sample, it holds the batch where `BatchAt` says."""


Layout = Union[BatchAt, MixesSamples]
BatchRule = Callable[[fx.Node, Dict[fx.Node, BatchAt]], Layout]
BATCH_MAJOR = BatchAt(0, 1)
BATCH_RULES: Dict[Any, BatchRule] = {}


def batch_rule(*targets: Any):
    """Decorator declaring the batch rule of ATen overloads."""

    def decorate(rule: BatchRule) -> BatchRule:
        for target in targets:
            BATCH_RULES[target] = rule
        return rule

    return decorate


def batch_layout(node: fx.Node, layouts: Dict[fx.Node, BatchAt]) -> Layout:
    """Where `node`'s value keeps the batch, given its batch-holding inputs' layouts."""
    if not layouts:
        return BATCH_MAJOR
    rule = declared_batch_rule(node) or BATCH_RULES.get(node.target)
    if rule is None:
        rule = _generic_rule if has_lowering(node) else _unlowered_rule
    return rule(node, layouts)


# ---- shapes and sizes (int or symbolic) ------------------------------------------------


def _value(node: Any) -> Any:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    return value if isinstance(value, torch.Tensor) else None


def _shape(node: Any) -> Optional[tuple]:
    value = _value(node)
    return tuple(value.shape) if value is not None else None


def _expr(size: Any) -> Any:
    """An int, or the sympy expression of a symbolic size."""
    node = getattr(size, "node", None)
    return node.expr if node is not None and hasattr(node, "expr") else int(size)


def _product(sizes: Sequence[Any]) -> Any:
    return math.prod(_expr(s) for s in sizes) if sizes else 1


def _exact_quotient(numerator: Any, denominator: Any) -> Optional[Any]:
    """numerator / denominator when it is a whole number (int or integer sympy expression)."""
    if isinstance(numerator, int) and isinstance(denominator, int):
        return numerator // denominator if denominator and numerator % denominator == 0 else None
    import sympy

    ratio = sympy.simplify(sympy.sympify(numerator) / sympy.sympify(denominator))
    if ratio.is_Integer:
        return int(ratio)
    return ratio if ratio.is_integer is True and ratio.is_positive is True else None


def _equal(a: Any, b: Any) -> bool:
    return _exact_quotient(_expr(a), _expr(b)) == 1


def graph_batch(graph: fx.Graph) -> Any:
    """The traced batch size: dim 0 of the graph's first tensor input (None without one)."""
    for node in graph.nodes:
        shape = _shape(node) if node.op == "placeholder" else None
        if shape:
            return _expr(shape[0])
    return None


def _only(layouts: Dict[fx.Node, BatchAt]) -> tuple:
    return next(iter(layouts.items()))


def _dims(value: Any, ndim: int) -> Optional[List[int]]:
    if value is None:
        return None
    values = [value] if isinstance(value, int) else list(value)
    return [d % max(ndim, 1) for d in values]


def _argument(node: fx.Node, name: str, default: Any = None) -> Any:
    """The value of the schema argument `name` (its schema default when not passed)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return default
    for index, argument in enumerate(schema.arguments):
        if argument.name == name:
            if name in node.kwargs:
                return node.kwargs[name]
            if index < len(node.args):
                return node.args[index]
            return argument.default_value if argument.has_default_value() else default
    return default


def _has_argument(node: fx.Node, name: str) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(a.name == name for a in schema.arguments)


# ---- rules ------------------------------------------------------------------------------


def _keep(node: fx.Node, layouts: Dict[fx.Node, BatchAt]) -> Layout:
    """Inputs broadcast against each other; their batch dims must line up in the output."""
    out = _shape(node)
    if out is None:
        return MixesSamples("has no tensor output to follow the batch into")
    found = set()
    for source, layout in layouts.items():
        shape = _shape(source)
        dim = layout.dim + len(out) - len(shape)
        if dim < 0 or not _equal(out[dim], shape[layout.dim]):
            return MixesSamples(f"broadcasts '{source.name}' along its batch {layout}")
        found.add(BatchAt(dim, layout.outer))
    if len(found) > 1:
        return MixesSamples(
            "combines values that hold the batch at different dims ("
            + ", ".join(sorted(str(f) for f in found))
            + ")"
        )
    return found.pop()


def _touched(node: fx.Node, layout: BatchAt, ndim: int) -> Optional[MixesSamples]:
    """The verdict for an op whose `dim` argument includes the batch dim (None if it does not)."""
    for name in ("dim", "dims", "dim0", "dim1"):
        if not _has_argument(node, name):
            continue
        value = _argument(node, name)
        if value is None or (isinstance(value, (list, tuple)) and not value):
            return MixesSamples(f"over every dim ({name}={value!r}) combines the samples of the batch")
        if layout.dim in _dims(value, ndim):
            return MixesSamples(f"with {name}={value!r} acts on {layout}, where the batch is")
    return None


def _generic_rule(node: fx.Node, layouts: Dict[fx.Node, BatchAt]) -> Layout:
    """Ops with a lowering and no rule of their own: schema dims, then broadcasting."""
    source, layout = _only(layouts)
    shape, out = _shape(source), _shape(node)
    if shape is None or out is None:
        return MixesSamples("has no traced shape to follow the batch through")
    touched = _touched(node, layout, len(shape))
    if touched is not None:
        return touched
    if len(out) < len(shape) and len(layouts) == 1:  # a reduction that drops its dims
        dims = _dims(_argument(node, "dim"), len(shape)) or []
        dim = layout.dim - sum(1 for d in dims if d < layout.dim)
        if dim < 0 or not _equal(out[dim], shape[layout.dim]):
            return MixesSamples(f"changes the batch {layout}")
        return BatchAt(dim, layout.outer)
    return _keep(node, layouts)


def _unlowered_rule(node: fx.Node, layouts: Dict[fx.Node, BatchAt]) -> Layout:
    """Ops without a lowering (they run in torch): the batch stays only where the op keeps the
    batch dim's size and position and no `dim` argument names it."""
    source, layout = _only(layouts)
    shape, out = _shape(source), _shape(node)
    if shape is None or out is None:
        return MixesSamples("has no traced tensor shape to follow the batch through")
    touched = _touched(node, layout, len(shape))
    if touched is not None:
        return touched
    if len(out) != len(shape) or not _equal(out[layout.dim], shape[layout.dim]):
        return MixesSamples(
            f"has no FHE lowering and changes the batch {layout} (shape {tuple(shape)} -> {tuple(out)})"
        )
    return _keep(node, layouts) if len(layouts) > 1 else layout


# views that only reshape (lowered in shape.py); alias has no lowering but moves no data
VIEW_RESHAPES = (
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.unsqueeze.default,
    aten.flatten.using_ints,
)
RESHAPES = VIEW_RESHAPES + (aten.alias.default,)


@batch_rule(*RESHAPES)
def reshape_rule(node: fx.Node, layouts: Dict[fx.Node, BatchAt]) -> Layout:
    """Row-major reshapes: the batch is the factor after `prefix` positions of the flat order;
    it stays whole in the output dim whose span contains it."""
    source, layout = _only(layouts)
    shape, out = _shape(source), _shape(node)
    batch = graph_batch(node.graph)
    if shape is None or out is None or batch is None:
        return MixesSamples("has no traced shape to follow the batch through")
    prefix = _product(shape[: layout.dim]) * _expr(layout.outer)
    for dim in range(len(out)):
        outer = _exact_quotient(prefix, _product(out[:dim]))
        if outer is None:
            break
        if _exact_quotient(_expr(out[dim]), outer * batch) is not None:
            return BatchAt(dim, outer)
    return MixesSamples(f"to shape {tuple(out)} splits the batch (at {layout} of {tuple(shape)}) across dims")


@batch_rule(aten.permute.default)
def permute_rule(node: fx.Node, layouts: Dict[fx.Node, BatchAt]) -> Layout:
    """A permute moves the batch with its dim."""
    _, layout = _only(layouts)
    dims = [d % max(len(node.args[1]), 1) for d in node.args[1]]
    return BatchAt(dims.index(layout.dim), layout.outer)


@batch_rule(aten.expand.default)
def expand_rule(node: fx.Node, layouts: Dict[fx.Node, BatchAt]) -> Layout:
    """Expand adds leading dims (the batch dim shifts) and repeats size-1 dims (not the batch)."""
    return _keep(node, layouts)


@batch_rule(aten.slice.Tensor)
def slice_rule(node: fx.Node, layouts: Dict[fx.Node, BatchAt]) -> Layout:
    """A slice of the batch dim that keeps all of it is a no-op; any other mixes samples."""
    source, layout = _only(layouts)
    shape, out = _shape(source), _shape(node)
    dim = _argument(node, "dim", 0) % len(shape)
    if dim == layout.dim and not _equal(out[dim], shape[dim]):
        return MixesSamples(f"slices {layout}, where the batch is")
    return layout


@batch_rule(aten.mm.default, aten.addmm.default, aten.bmm.default)
def matmul_rule(node: fx.Node, layouts: Dict[fx.Node, BatchAt]) -> Layout:
    """Matrix products keep the left operand's rows (and leading dims) and the right operand's
    columns; a batch in a contracted dim, or in both operands but not one shared leading dim,
    mixes samples."""
    left, right = node.args[-2:] if node.target is aten.addmm.default else node.args[:2]
    ndim = len(_shape(node))
    found = set()
    for operand, contracted in ((left, ndim - 1), (right, ndim - 2)):
        layout = layouts.get(operand)
        if layout is not None and layout.dim == contracted:
            return MixesSamples(f"contracts '{operand.name}' over its batch {layout}")
        if layout is not None:
            found.add(layout)
    if len(found) > 1 or (left in layouts and right in layouts and next(iter(found)).dim >= ndim - 2):
        return MixesSamples("multiplies values that hold the batch at different dims")
    return found.pop() if found else BATCH_MAJOR


@batch_rule(aten.convolution.default)
def convolution_rule(node: fx.Node, layouts: Dict[fx.Node, BatchAt]) -> Layout:
    """Convolutions keep the batch only on dim 0 (the channels are contracted, the spatial dims
    windowed)."""
    source, layout = _only(layouts)
    if layout.dim != 0 or len(layouts) > 1:
        return MixesSamples(f"convolves '{source.name}' whose batch is at {layout}")
    return layout


@batch_rule(aten.avg_pool2d.default, aten.max_pool2d_with_indices.default)
def pool_rule(node: fx.Node, layouts: Dict[fx.Node, BatchAt]) -> Layout:
    """Pooling windows the last two dims."""
    source, layout = _only(layouts)
    if layout.dim >= len(_shape(source)) - 2:
        return MixesSamples(f"pools over {layout}, where the batch is")
    return layout


@batch_rule(aten.native_layer_norm.default)
def layer_norm_rule(node: fx.Node, layouts: Dict[fx.Node, BatchAt]) -> Layout:
    """LayerNorm normalizes the trailing `normalized_shape` dims."""
    source = node.args[0]
    layout = layouts.get(source)
    if layout is None:
        return MixesSamples("normalizes a clear value with encrypted parameters")
    if layout.dim >= len(_shape(source)) - len(node.args[1]):
        return MixesSamples(f"normalizes over {layout}, where the batch is")
    return layout


@batch_rule(aten.embedding.default)
def embedding_rule(node: fx.Node, layouts: Dict[fx.Node, BatchAt]) -> Layout:
    """An embedding lookup keeps its indices' dims and appends the embedding dim."""
    layout = layouts.get(node.args[1])
    if layout is None:
        return MixesSamples("looks up an encrypted table")
    return layout


@batch_rule(aten.index.Tensor)
def index_rule(node: fx.Node, layouts: Dict[fx.Node, BatchAt]) -> Layout:
    """x[..., idx]: tensor indices after the batch dim keep it; on or before it they mix."""
    source, layout = _only(layouts)
    indices = list(node.args[1])
    if any(i is not None for i in indices[: layout.dim + 1]):
        return MixesSamples(f"indexes with a tensor on or before {layout}, where the batch is")
    return layout


@batch_rule(aten.constant_pad_nd.default)
def pad_rule(node: fx.Node, layouts: Dict[fx.Node, BatchAt]) -> Layout:
    """F.pad pads the trailing len(pad) / 2 dims."""
    source, layout = _only(layouts)
    ndim = len(_shape(source))
    pads = list(node.args[1])
    padded = {ndim - 1 - i for i in range(len(pads) // 2) if pads[2 * i] or pads[2 * i + 1]}
    if layout.dim in padded:
        return MixesSamples(f"pads {layout}, where the batch is")
    return layout


@batch_rule(operator.getitem)
def getitem_rule(node: fx.Node, layouts: Dict[fx.Node, BatchAt]) -> Layout:
    """One result of a multi-output op: where the op's first result keeps the batch."""
    source, layout = _only(layouts)
    value = source.meta.get("val")
    index = node.args[1]
    if isinstance(value, (tuple, list)) and index < len(value) and isinstance(value[index], torch.Tensor):
        first = value[0]
        if isinstance(first, torch.Tensor) and tuple(first.shape) != tuple(value[index].shape):
            picked = tuple(value[index].shape)
            if layout.dim >= len(picked) or not _equal(picked[layout.dim], first.shape[layout.dim]):
                return MixesSamples(f"picks result {index}, which does not keep the batch")
    return layout
