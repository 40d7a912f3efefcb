"""What every lowering works with: encrypted values and the lowering context.

A leaf module: the lowerings and the integer program (`fhe_backend.quantization.program`) both
import it, and it imports neither.

Every encrypted value is an `Encrypted`: an integer expression plus how to read it as a float,
either affine (``scale * (q - zero_point)``, usable by linear operations without any table
lookup) or through a pending element-wise function ``fn(q)``. Element-wise operations only
compose ``fn``; a table lookup happens when a linear operation needs its input affine again
(`LoweringContext.materialize`), so a whole chain of element-wise ops with the requantization
around it is ONE lookup.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Protocol, Set, Tuple

import numpy as np
import torch
import torch.fx as fx
from concrete import fhe

from ..errors import LoweringError
from ..quantization.calibration import NodeStats
from ..quantization.quantizers import UniformQuantizer
from ..settings import FheSettings

FloatFn = Callable[[np.ndarray], torch.Tensor]


@dataclass(eq=False)
class Encrypted:
    """An encrypted integer tensor `expr` and its float meaning.

    fn is None: float = scale * (expr - zero_point) (scale/zero_point may be per-position arrays).
    fn set: float = fn(expr) element-wise; `positional` when fn depends on the element's position.
    fresh: expr is a small quantized value (op_inputs bits), safe to feed a linear operation.
    """

    expr: Any
    scale: Any = 1.0
    zero_point: Any = 0.0
    fn: Optional[FloatFn] = None
    fresh: bool = False
    positional: bool = False

    def value_fn(self) -> FloatFn:
        """The float value as a function of the integer (for building table lookups)."""
        if self.fn is not None:
            return self.fn
        scale, zero_point = self.scale, self.zero_point
        return lambda q: torch.from_numpy((np.asarray(q, dtype=np.float64) - zero_point) * scale)

    @property
    def affine(self) -> bool:
        """True when no element-wise function is pending."""
        return self.fn is None

    @property
    def uniform(self) -> bool:
        """True when one scale and one zero-point hold for every element."""
        return self.affine and np.ndim(self.scale) == 0 and np.ndim(self.zero_point) == 0

    @property
    def centered(self):
        """expr - zero_point as integers (requires an integer zero-point)."""
        zero_point = np.rint(self.zero_point).astype(np.int64)
        return self.expr - zero_point if np.any(zero_point) else self.expr


def shape_of(value: Any) -> Tuple[int, ...]:
    """Shape of a numpy array, a concrete tracer or a constant."""
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None else tuple(np.shape(value))


def is_encrypted(value: Any) -> bool:
    """True for values that depend on the circuit's inputs."""
    return isinstance(value, Encrypted)


def with_value(value: Encrypted, **changes: Any) -> Encrypted:
    """A copy of `value` with some fields changed (same integer expression)."""
    return replace(value, **changes)


def constant_array(value: Any) -> np.ndarray:
    """A graph constant (tensor, scalar or array) as a float64 numpy array."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


class ProgramState(Protocol):
    """What a lowering context reads and writes on the integer program it runs in."""

    settings: FheSettings
    stats: Dict[str, NodeStats]
    constants: Dict[Any, Any]
    rounding_lsbs: Dict[str, int]
    lookup_offsets: Dict[str, int]
    # per-position clear shifts added on top of a lookup's offset (aligned rounding, QAT)
    lookup_shifts: Dict[str, np.ndarray]
    # while set: called with each lookup's key, unshifted input and table before the shifts are
    # read (IntegerProgram._align_rounding chooses them there)
    lookup_observer: Optional[Callable[[str, Any, Callable[[np.ndarray], np.ndarray]], None]]
    # while set: adds approximate rounding's noise to each approximately rounded lookup input
    # before it is rounded, given the input and the bits rounded away (quantization.slips)
    slips: Optional[Callable[[Any, int], Any]]
    recording: Optional[Dict[str, Tuple[int, int]]]
    input_quantizers: List[UniformQuantizer]
    pool_sums: Set[str]  # average pools whose window sum a linear op reads unrequantized
    lookup_sources: Dict[str, str]  # lookup key -> the node whose integers it reads

    def record_extremes(self, expr: Any, layout: Any = None) -> Tuple[int, int]:
        """(min, max) of an integer array whose batch lies as `layout` says (dim 0 by default)."""

    def value_stats(self, value: Encrypted, ctx: "LoweringContext") -> NodeStats:
        """Float statistics of the node that produced `value`."""

    def integers_source(self, expr: Any) -> Optional[str]:
        """The node that made the integer array/tracer `expr` in this run, if known."""

    def note_integers(self, key: str, expr: Any) -> None:
        """During a checked run: record a lookup's placed input (or an output, `key`
        "output:<node>") beyond what the circuit holds there (it would wrap around)."""


def _batch_dim(node: fx.Node) -> int:
    """The dim where the partitioner's batch rules placed the node's batch (0 by default)."""
    return getattr(node.meta.get("fhe_batch"), "dim", 0)


class LoweringContext:
    """What a lowering sees: the node, its calibration statistics, settings and helpers."""

    def __init__(self, program: ProgramState, node: fx.Node):
        self.program = program
        self.node = node
        self.settings = program.settings
        self._lookups = itertools.count()
        self.products = itertools.count()  # numbers the encrypted products of this node

    @property
    def stats(self) -> NodeStats:
        """Calibration statistics of this node's output."""
        return self.program.stats[self.node.name]

    def input_stats(self, index: int = 0) -> NodeStats:
        """Calibration statistics of the node's index-th tensor argument."""
        return self.program.stats[self.node.all_input_nodes[index].name]

    def out_shape(self, like: Any, input_index: int = 0) -> Tuple[int, ...]:
        """This node's output shape at run time: the dim holding the batch (`meta["fhe_batch"]`,
        dim 0 by default) scales with `like`'s batch dim, the others are as recorded."""
        recorded_out = list(self.stats.shape)
        recorded_in = self.input_stats(input_index).shape
        dim_in = _batch_dim(self.node.all_input_nodes[input_index])
        dim_out = _batch_dim(self.node)
        recorded_out[dim_out] = shape_of(like)[dim_in] * recorded_out[dim_out] // recorded_in[dim_in]
        return tuple(recorded_out)

    def _batch_layout(self, expr: Any) -> Any:
        """Where the batch lies in a lookup's input: the node's layout (`meta["fhe_batch"]`) when
        the input has the node's rank, else None (dim 0)."""
        stats = self.program.stats.get(self.node.name)
        if stats is None or len(shape_of(expr)) != len(stats.shape):
            return None
        return self.node.meta.get("fhe_batch")

    def cache(self, key: str, build: Callable[[], Any]) -> Any:
        """Memoize constants derived from the graph (quantized weights) across runs."""
        full_key = (self.node.name, key)
        if full_key not in self.program.constants:
            self.program.constants[full_key] = build()
        return self.program.constants[full_key]

    def lookup(self, expr: Any, table: Callable[[np.ndarray], np.ndarray], exact: bool = False) -> Any:
        """One table lookup, after rounding the input to `rounding_threshold_bits` if set.

        `exact` lookups read their input unrounded and unshifted (a copy of a narrow value that
        must stay exact, e.g. the correction term of an encrypted product).
        """
        if exact:
            return fhe.univariate(table)(expr)
        key = f"{self.node.name}:{next(self._lookups)}"
        self.program.lookup_sources[key] = self.program.integers_source(expr) or self.node.name
        if self.program.recording is not None:
            low, high = self.program.record_extremes(expr, self._batch_layout(expr))
            old = self.program.recording.get(key)
            if old is not None:
                low, high = min(low, old[0]), max(high, old[1])
            self.program.recording[key] = (low, high)
        if self.program.lookup_observer is not None:
            self.program.lookup_observer(key, expr, table)
        offset: Any = self.program.lookup_offsets.get(key, 0)
        shift = self.program.lookup_shifts.get(key)
        if shift is not None:  # per-position: aligns the rounding grid (IntegerProgram._align_rounding)
            offset = offset + shift
        if np.any(offset):  # a clear addition that centers the range: one bit less to round and look up
            expr, inner = expr + offset, table
            table = lambda q: inner(np.asarray(q) - offset)  # noqa: E731
        self.program.note_integers(key, expr)
        lsbs = self.program.rounding_lsbs.get(key, 0)
        if lsbs:
            approximate = self.settings.rounding_threshold_bits.approximate
            exactness = fhe.Exactness.APPROXIMATE if approximate else fhe.Exactness.EXACT
            if approximate and self.program.slips is not None:
                expr = self.program.slips(expr, lsbs)
            expr = fhe.round_bit_pattern(expr, lsbs_to_remove=lsbs, exactness=exactness)
        return fhe.univariate(table)(expr)

    def materialize(
        self, value: Any, n_bits: Optional[int] = None, stats: Optional[NodeStats] = None
    ) -> Encrypted:
        """Requantize `value` to a fresh `n_bits` (default op_inputs) value: one table lookup.

        The output range comes from `stats` (default: this node's calibration statistics).
        """
        if not is_encrypted(value):
            raise LoweringError(f"node '{self.node.name}': cannot requantize a clear constant")
        if n_bits is None:
            n_bits = self.settings.n_bits.op_inputs
        stats = stats or self.program.value_stats(value, self)
        quantizer = UniformQuantizer.from_range(stats.low, stats.high, n_bits)
        float_fn = value.value_fn()
        table = lambda q: quantizer.quantize(float_fn(q).numpy())  # noqa: E731
        expr = self.lookup(value.expr, table)
        return Encrypted(expr, quantizer.scale, quantizer.zero_point, fresh=True)

    def as_linear_input(self, value: Any, stats: Optional[NodeStats] = None) -> Encrypted:
        """A fresh, uniformly scaled value with an integer zero-point (materialized if needed)."""
        if value.fresh and value.uniform and float(value.zero_point) == float(np.rint(value.zero_point)):
            return value
        return self.materialize(value, stats=stats)

    def rescale(self, value: Encrypted, scale: Any) -> Encrypted:
        """value expressed on `scale` with zero-point 0: one table lookup (round(v / scale))."""
        float_fn = value.value_fn()
        table = lambda q: np.rint(float_fn(q).numpy() / scale).astype(np.int64)  # noqa: E731
        return Encrypted(self.lookup(value.expr, table), scale, 0.0)
