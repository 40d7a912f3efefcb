"""The lowering registry: the one source of truth for what runs in FHE.

A node is FHE-supported exactly when a lowering is registered for its ATen overload (or it is a
pointwise op, handled generically) and that lowering's validator accepts the node. The
partitioner asks `unsupported_reason`; the integer program asks `lowering_for`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.fx as fx

from ..errors import LoweringError

Validator = Callable[[fx.Node], Optional[str]]


@dataclass(frozen=True)
class Lowering:
    """How one op becomes integer operations, and which of its nodes are accepted."""

    fn: Callable[..., Any]
    validator: Optional[Validator] = None
    # where the output keeps the batch (see lowering.batch); None: the rule of lowering.batch
    batch: Optional[Callable[..., Any]] = None

    def reason(self, node: fx.Node) -> Optional[str]:
        """None when the node is accepted, else why not."""
        return self.validator(node) if self.validator else None


LOWERINGS: Dict[Any, Lowering] = {}
_POINTWISE: List[Lowering] = []


def register(
    *targets: Any, validator: Optional[Validator] = None, batch: Optional[Callable[..., Any]] = None
):
    """Decorator registering a lowering `fn(ctx, *args, **kwargs)` for ATen overloads.

    `batch` is the op's batch rule `(node, layouts) -> BatchAt | MixesSamples` (see
    `lowering.batch`); without one, the rule declared there for the op (or its generic rule).
    """

    def decorate(fn):
        for target in targets:
            LOWERINGS[target] = Lowering(fn, validator, batch)
        return fn

    return decorate


def register_pointwise(fn: Callable[..., Any], validator: Optional[Validator] = None) -> None:
    """The generic lowering of ATen ops tagged pointwise without a lowering of their own."""
    _POINTWISE[:] = [Lowering(fn, validator)]


def is_pointwise(target: Any) -> bool:
    """True for ATen overloads tagged `pointwise`."""
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def _find(node: fx.Node) -> Optional[Lowering]:
    if node.target in LOWERINGS:
        return LOWERINGS[node.target]
    if is_pointwise(node.target) and _POINTWISE:
        return _POINTWISE[0]
    return None


def has_lowering(node: fx.Node) -> bool:
    """True when a lowering is registered for the node's op (validators aside)."""
    return _find(node) is not None


def declared_batch_rule(node: fx.Node) -> Optional[Callable[..., Any]]:
    """The batch rule passed to `register` with the node's lowering, if any."""
    lowering = _find(node)
    return lowering.batch if lowering is not None else None


def lowering_for(node: fx.Node) -> Lowering:
    """The lowering of a supported node; raises LoweringError otherwise."""
    lowering = _find(node)
    if lowering is None:
        raise LoweringError(f"no FHE lowering for {op_name(node)} (node '{node.name}')")
    return lowering


def unsupported_reason(node: fx.Node) -> Optional[str]:
    """None when `node` can run in FHE, else a sentence saying why it cannot."""
    if node.op != "call_function":
        return None
    lowering = _find(node)
    if lowering is None:
        return f"no FHE lowering for {op_name(node)}"
    return lowering.reason(node)


def op_name(node: fx.Node) -> str:
    """A readable name of the node's operator, e.g. 'aten.relu.default'."""
    target = node.target
    if target is operator.getitem:
        return "getitem"
    return (
        str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))
    )


# ---- helpers shared by validators -------------------------------------------------------


def is_constant(arg: Any) -> bool:
    """True for graph constants (baked weights, folded constants) and Python scalars."""
    if isinstance(arg, fx.Node):
        return arg.op == "get_attr"
    return True


def meta_shape(node: Any) -> Optional[Sequence[Any]]:
    """The node's traced shape (may hold symbolic sizes), or None."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


ONE_SAMPLE_AT_A_TIME = "FHE circuits run one sample at a time"


def batch_dim_of(node: Any) -> int:
    """The dim where `node`'s value keeps the batch, as the partitioner's batch rules placed it
    (`meta["fhe_batch"]`, see `lowering.batch`); dim 0 before they ran."""
    layout = node.meta.get("fhe_batch") if isinstance(node, fx.Node) else None
    return getattr(layout, "dim", 0)


def touches_batch_dim(dims: Any, ndim: Optional[int], batch_dim: int = 0) -> bool:
    """True when `dims` include `batch_dim` (None or [] means every dim)."""
    if dims is None or ndim is None:
        return dims is None
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims:
        return True
    return any(d % max(ndim, 1) == batch_dim for d in dims)


def batch_dim_reason(dims: Any, node: fx.Node, what: str = "dims") -> Optional[str]:
    """Reason string when an op acts across samples (on its input's batch dim), else None."""
    source = node.all_input_nodes[0] if node.all_input_nodes else None
    shape = meta_shape(source) if source is not None else None
    batch_dim = batch_dim_of(source)
    if touches_batch_dim(dims, len(shape) if shape is not None else None, batch_dim):
        return (
            f"{op_name(node)} with {what}={dims!r} acts on dim {batch_dim} (the batch); "
            f"{ONE_SAMPLE_AT_A_TIME}"
        )
    return None
