"""The integer program of one FHE partition.

Interpreting a partition's ATen graph with the registered lowerings yields a numpy function of
integer inputs. The same function runs in three ways: on numpy arrays (``disable`` mode and the
integer calibration that sizes rounding), and traced by ``concrete.fhe.Compiler`` into a circuit.

Values and the context the lowerings see are in `fhe_backend.lowering.context`; which
lowering runs for a node comes from `fhe_backend.lowering.registry`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.fx as fx
from concrete import fhe
from torch.utils._pytree import tree_leaves

from ..errors import BitWidthError, LoweringError
from ..graph_utils import as_tuple, fetch_attr, output_nodes, where
from ..lowering.context import Encrypted, LoweringContext, is_encrypted
from ..lowering.quant import FAKE_QUANT, fake_quant_spec
from ..lowering.registry import lowering_for
from ..settings import (
    AUTO_ROUNDING_MAX_BITS,
    AUTO_ROUNDING_MIN_BITS,
    AUTO_ROUNDING_TOLERANCE,
    MAX_TLU_BIT_WIDTH,
    FheSettings,
)
from .calibration import NodeStats
from .quantizers import OutputDequantizer, UniformQuantizer, bit_width
from .slips import slips_under

ROUNDED_CALIBRATION_PASSES = 8  # placements of rounded lookups on the ranges the last one gave
CENTERING_MARGIN = 0.125  # share of a lookup's calibrated span kept free on each side when centering
WEIGHTED_OPS = (
    torch.ops.aten.mm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.convolution.default,
)
# products of two encrypted values: Concrete bootstraps inside them (see _bootstraps)
PRODUCT_OPS = (torch.ops.aten.mul.Tensor, torch.ops.aten.mm.default, torch.ops.aten.bmm.default)
# ops that join parts of different scales: each part keeps its own (an activation's or an input's)
JOINING_OPS = (torch.ops.aten.cat.default, torch.ops.aten.stack.default)
# The circuit adds a float bias rounded to the output step. In a QAT program whose lookups read
# Brevitas' exact accumulators (no rounding: the bias's rounding would be the only error
# against Brevitas) the output's step is made 2**this finer first (Brevitas' 3-bit digits MLP:
# max error 0.007 instead of 0.11, argmax agreement 99.8% instead of 98.4%; 8 bits: exact).
# The output is then wider, and so are the last lookups' outputs that feed it (digits
# QATSimpleNet: 11 bits instead of 7, 1.62x the complexity without rounding). Where lookups are
# rounded, their error (steps of the output) dwarfs the bias's half step: the output gets only
# the bits that keep it no wider than the widest lookup input (`IntegerProgram._narrow_bias`;
# at 6-bit lookups 4 bits cost 1.31x, at 5-bit ones 1.31x, for no change in argmax agreement).
# Elsewhere the rounding (half of input step x weight step) is below one input element's
# quantization error: kept.
QAT_BIAS_BITS = 4
# Lookups that read exact accumulators: the output may be this many bits wider than the widest
# (digits QATSimpleNet, 7-bit lookups: 2 bias bits cost 1.00x Concrete ML's complexity with
# 99.8% argmax agreement with Brevitas; 4 bits, 11-bit output, cost 1.62x)
QAT_UNROUNDED_OUTPUT_SLACK = 2
# Rounded lookups' grid (IntegerProgram.rounding_grid): ALIGNED_GRID puts a QAT program's edges at
# the QuantReLU's thresholds and leaves a float program's approximate rounding at the phase its
# placement gives; ZERO_GRID rounds through 0 (exact rounding always does)
ALIGNED_GRID, ZERO_GRID = "aligned", "zero"


def qat_input_quantizer(placeholder: fx.Node) -> Optional[UniformQuantizer]:
    """The quantizer of a partition input read only by per-tensor fake-quants with one spec
    (quantization-aware training: the model's own input quantizer), else None."""
    specs = {fake_quant_spec(user) for user in placeholder.users}
    if len(specs) != 1 or None in specs:
        return None
    if any(user.args[0] is not placeholder for user in placeholder.users):
        return None
    return specs.pop().input_quantizer()


class IntegerProgram:
    """The integer function of one partition, callable on numpy arrays or concrete tracers."""

    def __init__(
        self,
        graph_module: fx.GraphModule,
        stats: Dict[str, NodeStats],
        settings: FheSettings,
        encryption_status: Sequence[str],
    ):
        self.graph_module = graph_module
        self.stats = stats
        self.settings = settings
        self.encryption_status = tuple(encryption_status)
        self.constants: Dict[Any, Any] = {}
        self.rounding_lsbs: Dict[str, int] = {}
        # lookups over Concrete's limit: (node, bits, low, high); an error only for a circuit
        self.too_wide: List[Tuple[str, int, int, int]] = []
        self.lookup_offsets: Dict[str, int] = {}
        # QAT: per-position shifts that align each rounded lookup's grid (see _align_rounding)
        self.lookup_shifts: Dict[str, np.ndarray] = {}
        self.rounding_grid = ALIGNED_GRID  # or ZERO_GRID (precision_search tries both where they differ)
        self.lookup_observer: Optional[Any] = None  # see LoweringContext.lookup
        self.slips: Optional[Any] = None  # see LoweringContext.lookup (quantization.slips)
        # precision_search: bits kept by each lookup (key -> bits) over rounding_threshold_bits
        self.lookup_precision: Dict[str, int] = {}
        self.precision_choice: Any = None  # the search's PrecisionChoice, when it ran
        self.recording: Optional[Dict[str, Tuple[int, int]]] = None
        # while extreme_samples collects them: where in the batch (row / rows) extremes lie
        self.extreme_positions: Optional[set] = None
        self.placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
        self.tensor_inputs = [n for n in self.placeholders if n.name in stats]
        self.qat = any(node.target == FAKE_QUANT for node in graph_module.graph.nodes)
        self.input_quantizers = [self._input_quantizer(node) for node in self.tensor_inputs]
        self.output_dequantizers: List[OutputDequantizer] = []
        # per thread, during one run: id(value) -> (value, statistics of the node that made it);
        # holding the value keeps its id from being reused by another value within the run
        self._run_state = threading.local()
        # linear ops feeding an output with per-tensor weights: node name -> extra weight bits
        self.one_scale_nodes: Dict[str, int] = {}
        self.pool_sums: Set[str] = set()  # see ProgramState.pool_sums
        self._relower = False
        self.output_bias_bits: Dict[str, int] = {}  # output node -> bits of finer step for its bias
        # QAT: bits of finer output step where the bias is fractional; None: QAT_BIAS_BITS without
        # rounding, else as many as keep the output within the lookups' width (_narrow_bias)
        self.qat_bias_bits: Optional[int] = None
        self._bias_widths: Dict[str, List[int]] = {}  # output -> its width at 0..QAT_BIAS_BITS bits
        self.output_widths: Dict[str, int] = {}  # output node -> its integer width on the inputset
        self.encrypted_products = False  # set when a run meets a product of encrypted values
        # lookup key -> the node that computed the integers it reads (a linear op's accumulator,
        # read by the lookup of the activation fused after it): how reports name lookups
        self.lookup_sources: Dict[str, str] = {}
        # lookup key (or "output:<node>") -> the integers its input (offset included), or the
        # output, holds in the circuit: beyond them a value wraps around under FHE (see
        # run_checking_wraps)
        self.capacity: Dict[str, Tuple[int, int]] = {}
        # output node -> (low, modulus): the integers its decrypted values stand for, once the
        # circuit is compiled (see set_output_window)
        self.output_windows: Dict[str, Tuple[int, int]] = {}

    def _input_quantizer(self, node: fx.Node) -> UniformQuantizer:
        qat_quantizer = qat_input_quantizer(node)  # QAT: the model's own input quantizer
        if qat_quantizer is not None:
            return qat_quantizer
        stats = self.stats[node.name]
        if stats.integral and stats.low >= 0:
            # integer inputs (token ids, indices) are exact with scale 1
            return UniformQuantizer(1.0, 0, bit_width(stats.low, stats.high))
        bits = self.settings.n_bits.model_inputs
        if self.qat and not any(user.target == FAKE_QUANT for user in node.users):
            warnings.warn(
                f"fhe_backend: input '{node.name}' of this quantization-aware model is not quantized "
                f"by the model (no input quantizer, e.g. a Brevitas QuantIdentity, reads it): it is "
                f"quantized to {bits} bits (n_bits['model_inputs']) on the inputset's range, so "
                "results differ from the model's own, which sees floats there; add an input "
                "quantizer and train with it to get the model's results (Concrete ML refuses such "
                "a model)",
                stacklevel=2,
            )
        return UniformQuantizer.from_range(stats.low, stats.high, bits)

    def record_extremes(self, expr: Any, layout: Any = None) -> Tuple[int, int]:
        """(min, max) of an integer array; while `extreme_samples` runs, also where in the batch
        they lie. `layout` (a `BatchAt`: the batch in dim `dim`, after `outer` positions of it,
        e.g. attention's (seq, batch * heads, d) views) says where the batch is; batch-major
        on dim 0 by default."""
        array = np.asarray(expr)
        if not array.size:
            return 0, 0
        if self.extreme_positions is not None:
            shape = array.shape or (1,)
            dim, outer = getattr(layout, "dim", 0), getattr(layout, "outer", 1)
            if not (isinstance(outer, int) and outer > 0 and dim < len(shape) and shape[dim] % outer == 0):
                dim, outer = 0, 1
            block = shape[dim] // outer  # the batch's positions along `dim`, repeated `outer` times
            for flat_index in (np.argmin(array), np.argmax(array)):
                position = int(np.unravel_index(flat_index, shape)[dim]) % block
                self.extreme_positions.add(float(position) / block)
        return int(array.min()), int(array.max())

    def extreme_samples(self, q_inputs: Sequence[np.ndarray], samples: int) -> set:
        """Indices of the samples (of `samples` in the batch-major inputs) where a lookup input
        or an output reaches its minimum or maximum."""
        recording, self.recording, self.extreme_positions = self.recording, {}, set()
        try:
            self(*q_inputs)
            positions = self.extreme_positions
        finally:
            self.recording, self.extreme_positions = recording, None
        # row / rows is exact in reals, not in floats (29 / 200 * 200 = 28.999...)
        return {min(int(position * samples + 1e-9), samples - 1) for position in positions}

    def run_checking_wraps(self, *q_inputs: Any) -> Tuple[Any, List[Tuple[str, int, int, int, int]]]:
        """Run in the clear and report the lookups whose input went beyond what the circuit
        holds (it would wrap around under FHE): (key, low, high, capacity low, capacity high)."""
        self._run_state.wraps = []
        try:
            result = self(*q_inputs)
            return result, list(self._run_state.wraps)
        finally:
            self._run_state.wraps = None

    def set_output_window(self, index: int, name: str, window: Tuple[int, int]) -> None:
        """The compiled circuit decrypts output `index` (node `name`) into `window` = (low,
        modulus): its dequantizer maps decrypted values there, and a clear run warns beyond it."""
        self.output_windows[name] = window
        self.capacity[f"output:{name}"] = (window[0], window[0] + window[1] - 1)
        if index < len(self.output_dequantizers):
            self.output_dequantizers[index].window = window

    def note_integers(self, key: str, expr: Any) -> None:
        """During `run_checking_wraps`: record a lookup input or an output (`key`) beyond its
        capacity."""
        wraps = getattr(self._run_state, "wraps", None)
        capacity = self.capacity.get(key)
        if wraps is None or capacity is None or not isinstance(expr, np.ndarray) or not expr.size:
            return
        low, high = int(expr.min()), int(expr.max())
        if low < capacity[0] or high > capacity[1]:
            wraps.append((key, low, high, *capacity))

    def integers_source(self, expr: Any) -> Optional[str]:
        """The node whose lowering first made the integer array/tracer `expr` in this run."""
        entry = getattr(self._run_state, "sources", {}).get(id(expr))
        return entry[1] if entry is not None and entry[0] is expr else None

    def value_stats(self, value: Encrypted, ctx: LoweringContext) -> NodeStats:
        """Float statistics of a value: of the node that produced it (default: ctx's node)."""
        entry = getattr(self._run_state, "value_stats", {}).get(id(value))
        return entry[1] if entry is not None and entry[0] is value else ctx.stats

    def quantize_inputs(self, *inputs: Any) -> Tuple[np.ndarray, ...]:
        """Float tensors/arrays -> the integer inputs of the program, C-contiguous (numpy keeps a
        permuted input's strides, and Concrete reads its inputs' buffers in C order)."""
        return tuple(
            np.ascontiguousarray(q.quantize(_numpy(x))) for q, x in zip(self.input_quantizers, inputs)
        )

    def dequantize_outputs(self, *outputs: Any) -> Tuple[np.ndarray, ...]:
        """Integer outputs of the program -> float arrays."""
        return tuple(d.dequantize(y) for d, y in zip(self.output_dequantizers, outputs))

    def __call__(self, *q_inputs: Any):
        """Run the program on integer inputs (numpy arrays or concrete tracers)."""
        result = self._run(q_inputs)
        # linear ops moved to one weight scale (see _one_output_scale): again, until no more
        # move (each run marks new ones: a layer's spread can hide the one behind it)
        while self._relower:
            self._relower = False
            self.constants.clear()
            if self.recording is not None:
                self.recording.clear()
            result = self._run(q_inputs)
        return result

    def _run(self, q_inputs: Sequence[Any]):
        env: Dict[fx.Node, Any] = {}
        inputs = iter(q_inputs)
        self._run_state.value_stats, self._run_state.sources = {}, {}
        try:
            for node in self.graph_module.graph.nodes:
                if node.op == "placeholder":
                    env[node] = self._placeholder(node, inputs)
                elif node.op == "get_attr":
                    env[node] = fetch_attr(self.graph_module, node.target)
                elif node.op == "call_function":
                    env[node] = self._call(node, env)
                elif node.op == "output":
                    return self._outputs(node, env)
        finally:
            self._run_state.value_stats, self._run_state.sources = {}, {}
        raise LoweringError("partition graph has no output node")

    def _note_stats(self, value: Any, node: fx.Node) -> None:
        self._run_state.value_stats[id(value)] = (value, self.stats[node.name])

    def _placeholder(self, node: fx.Node, inputs) -> Any:
        if node not in self.tensor_inputs:
            return None  # symbolic sizes: shapes come from calibration instead
        index = self.tensor_inputs.index(node)
        quantizer = self.input_quantizers[index]
        value = Encrypted(next(inputs), quantizer.scale, quantizer.zero_point, fresh=True)
        self._note_stats(value, node)
        return value

    def _call(self, node: fx.Node, env: Dict[fx.Node, Any]) -> Any:
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        ctx = LoweringContext(self, node)
        if node.name in self.one_scale_nodes:  # per-tensor weights: the output has one scale
            n_bits = self.settings.n_bits
            wider = dataclasses.replace(
                n_bits, op_weights=n_bits.op_weights + self.one_scale_nodes[node.name]
            )
            ctx.settings = self.settings.replace(per_channel_weights=False, n_bits=wider)
        if node.target in PRODUCT_OPS and sum(is_encrypted(a) for a in args) > 1:
            self.encrypted_products = True
        if not any(is_encrypted(a) for a in tree_leaves((args, kwargs))):
            return node.target(*args, **kwargs)  # constant folding
        try:
            result = lowering_for(node).fn(ctx, *args, **kwargs)
        except (BitWidthError, LoweringError):
            raise
        except Exception as error:
            raise LoweringError(
                f"lowering {node.target} failed at node '{node.name}'"
                f"{where(node)}: {type(error).__name__}: {error}"
            ) from error
        if is_encrypted(result) and node.name in self.stats:
            self._note_stats(result, node)
        if is_encrypted(result):  # the first node to make these integers (fusions keep them)
            self._run_state.sources.setdefault(id(result.expr), (result.expr, node.name))
        return result

    def _outputs(self, node: fx.Node, env: Dict[fx.Node, Any]):
        results, dequantizers = [], []
        outputs_ctx = LoweringContext(self, node)  # its lookups: "output:i", apart from the nodes'
        for out_node in output_nodes(node):
            value = env[out_node]
            ctx = LoweringContext(self, out_node)
            if not is_encrypted(value):
                raise LoweringError(f"partition output '{out_node.name}' does not depend on any input")
            if not value.affine:
                value = ctx.materialize(value, self.settings.n_bits.model_outputs, self.stats[out_node.name])
            joined = self._one_output_scale(out_node, env)
            if _scale_spread(value) > 1.0 and not joined and self._bootstraps():
                # other per-position scales (a gain) in a circuit that bootstraps: one more lookup
                # costs less than the wider values `public_output` would make (Concrete finds no
                # parameters for them where lookups or encrypted products share their width)
                value = outputs_ctx.materialize(
                    value, self.settings.n_bits.model_outputs, self.stats[out_node.name]
                )
            if (
                self.qat
                and self.recording is not None
                and isinstance(value.expr, np.ndarray)
                and out_node.name not in self.output_bias_bits  # set once per calibration
            ):
                self.output_bias_bits[out_node.name] = self._bias_bits(out_node.name, value, joined)
            bias_bits = self.output_bias_bits.get(out_node.name, 0)
            expr, scale = public_output(value, self.settings.n_bits.model_outputs, bias_bits, joined)
            if self.recording is not None:
                width = bit_width(*self.record_extremes(expr))
                self.output_widths[out_node.name] = max(width, self.output_widths.get(out_node.name, 0))
            self.note_integers(f"output:{out_node.name}", expr)
            results.append(expr)
            dequantizers.append(OutputDequantizer(scale, 0.0, self.output_windows.get(out_node.name)))
        self.output_dequantizers = dequantizers
        return results[0] if len(results) == 1 else tuple(results)

    def _bias_bits(self, name: str, value: Encrypted, joined: bool) -> int:
        """QAT, on the calibration run: the output's bias bits before rounding is known
        (`qat_bias_bits`, else QAT_BIAS_BITS); records the output's width at each count."""
        if not _fractional_bias(value):
            return 0
        widths = []
        for bits in range(QAT_BIAS_BITS + 1):
            expr, _ = public_output(value, self.settings.n_bits.model_outputs, bits, joined)
            widths.append(bit_width(int(np.min(expr)), int(np.max(expr))))
        self._bias_widths[name] = widths
        return QAT_BIAS_BITS if self.qat_bias_bits is None else self.qat_bias_bits

    def _narrow_bias(
        self, ranges: Dict[str, Tuple[int, int]], raw_ranges: Dict[str, Tuple[int, int]], slack: int = 0
    ) -> None:
        """QAT with lookups and no `qat_bias_bits` given: each output with a fractional bias gets
        the most bits, up to QAT_BIAS_BITS, that keep it no wider than the widest lookup input
        plus `slack` bits (an output wider than those widens the lookups that feed it)."""
        widest = slack + max(_seen_width(ranges[key], raw_ranges[key]) for key in ranges)
        for name, widths in self._bias_widths.items():
            self.output_bias_bits[name] = max((b for b, w in enumerate(widths) if w <= widest), default=0)

    def _has_lookups(self) -> bool:
        """Whether the program has table lookups (those recorded so far, in a calibration run)."""
        return bool(self.recording) if self.recording is not None else bool(self.lookup_offsets)

    def _bootstraps(self) -> bool:
        """Whether the circuit bootstraps: table lookups, or products of encrypted values."""
        return self.encrypted_products or self._has_lookups()

    def _one_output_scale(self, out_node: fx.Node, env: Dict[fx.Node, Any]) -> bool:
        """Give the output one scale at its source: the linear ops whose per-channel weight
        scales reach `out_node` through leveled ops take per-tensor weights, with up to the option
        `output_extra_weight_bits` more bits (DEFAULT_OUTPUT_EXTRA_WEIGHT_BITS), from the next
        run on (`__call__` runs again at once).

        Per-channel output scales would tell the client each row's largest weight. Marks only on
        a numpy run (the first run is the calibration's); what remains goes to `public_output`.
        Returns True when the remaining per-position scales come only from joining parts
        (`JOINING_OPS`: each part's own scale, kept), False when a constant brought them.
        """
        if _scale_spread(env[out_node]) == 1.0:
            return False
        numpy_run = isinstance(env[out_node].expr, np.ndarray)
        joined = True
        stack, seen = [out_node], set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node.target in WEIGHTED_OPS:  # its inputs were requantized to one scale: the
                if numpy_run and node.name not in self.one_scale_nodes:  # spread is its weights'
                    bits = math.log2(min(_scale_spread(env[node]), 2**self.settings.output_extra_weight_bits))
                    extra = math.floor(bits) if self._bootstraps() else math.ceil(bits)
                    self.one_scale_nodes[node.name] = extra
                    self._relower = True
                continue
            spread = [n for n in node.all_input_nodes if _scale_spread(env.get(n)) > 1.0]
            stack.extend(spread)
            if not spread and node.target not in JOINING_OPS:
                joined = False  # a constant vector multiplied in, a norm's gain
        return joined

    def _search_rounding(self, q_inputs: Sequence[np.ndarray], ranges: Dict[str, Tuple[int, int]]) -> None:
        """rounding_threshold_bits="auto": the fewest bits per lookup within the error budget.

        The cost of a circuit is set by its widest lookups, so the search first finds the
        lowest precision, up to AUTO_ROUNDING_MAX_BITS, that every lookup can share, then lowers
        single lookups further in graph order, each step kept only while the outputs stay within
        AUTO_ROUNDING_TOLERANCE of the unrounded program on the calibration set (or within the
        error at the widest precision allowed, with a warning, when that is already above it).
        Approximate rounding is scored with its slips drawn (`quantization.slips`).
        """
        sample = list(q_inputs)
        reference = self.dequantize_outputs(*as_tuple(self(*sample)))
        spans = [max(float(np.ptp(r)), 1e-9) for r in reference]
        widths = {key: bit_width(low, high) for key, (low, high) in ranges.items()}
        lookups = self.lookups_per_sample(sample) if self._approximate else 0

        def error(kept: Dict[str, int]) -> float:
            self.rounding_lsbs = {key: widths[key] - bits for key, bits in kept.items() if bits < widths[key]}
            with self.drawing_slips(lookups):
                return _output_error(self, sample, reference, spans)

        def shared(bits: int) -> Dict[str, int]:
            return {key: min(bits, width) for key, width in widths.items()}

        widest = min(max(widths.values(), default=0), AUTO_ROUNDING_MAX_BITS)
        precision = next(
            (
                bits
                for bits in range(AUTO_ROUNDING_MIN_BITS, widest)
                if error(shared(bits)) <= AUTO_ROUNDING_TOLERANCE
            ),
            widest,
        )
        kept = shared(precision)
        budget = max(AUTO_ROUNDING_TOLERANCE, error(kept))
        if budget > AUTO_ROUNDING_TOLERANCE:
            warnings.warn(
                f"fhe_backend: rounding_threshold_bits='auto' keeps lookups at most "
                f"{AUTO_ROUNDING_MAX_BITS} bits wide; there the outputs are {budget:.1%} of their "
                f"span off the unrounded program (budget {AUTO_ROUNDING_TOLERANCE:.0%}). Pass a "
                "number of bits (e.g. 7 or 8) for more accuracy at a higher cost",
                stacklevel=2,
            )
        for key in widths:
            while kept[key] > AUTO_ROUNDING_MIN_BITS and error({**kept, key: kept[key] - 1}) <= budget:
                kept[key] -= 1
        error(kept)

    def lookups_per_sample(self, q_inputs: Sequence[np.ndarray]) -> int:
        """Table lookups (PBS) the circuit makes for one sample: the first row of `q_inputs`
        run once, its lookups' elements counted."""
        sizes: List[int] = []
        self._run_observing(
            lambda key, expr, table: sizes.append(int(np.size(expr))), [np.asarray(q)[:1] for q in q_inputs]
        )
        return sum(sizes)

    def _run_observing(
        self, observer: Callable[[str, Any, Any], None], q_inputs: Sequence[np.ndarray]
    ) -> None:
        """Run the program on `q_inputs` with `observer(key, input, table)` called at each lookup
        (`LoweringContext.lookup`)."""
        self.lookup_observer = observer
        try:
            self(*q_inputs)
        finally:
            self.lookup_observer = None

    @contextlib.contextmanager
    def drawing_slips(self, lookups_per_sample: int) -> Iterator[None]:
        """Within the block, numpy runs of an approximately rounded program draw the rounding's
        slips (`quantization.slips`, a fixed seed) under the program's error budget, shared by
        `lookups_per_sample` lookups where it is global; other programs run unchanged."""
        if self._approximate:
            self.slips = slips_under(self.settings.error_budget(), lookups_per_sample)
        try:
            yield
        finally:
            self.slips = None

    def _place_lookups(self, ranges: Dict[str, Tuple[int, int]]) -> None:
        """Choose each lookup's clear offset from its raw range and its current rounding."""
        self.lookup_offsets = {
            key: _lookup_offset(low, high, self.rounding_lsbs.get(key, 0))
            for key, (low, high) in ranges.items()
        }

    def _placed(self, ranges: Dict[str, Tuple[int, int]]) -> Dict[str, Tuple[int, int]]:
        """The ranges the lookups see once their offsets are added."""
        return {
            key: (low + self.lookup_offsets[key], high + self.lookup_offsets[key])
            for key, (low, high) in ranges.items()
        }

    def check_circuit_bit_widths(self) -> None:
        """Raise BitWidthError when a lookup is wider than Concrete allows (checked before
        compiling a circuit; the integer program itself runs at any width in the clear)."""
        if not self.too_wide:
            return
        node, effective, low, high = max(self.too_wide, key=lambda item: item[1])
        raise BitWidthError(
            f"table lookup at node '{node}' needs a {effective}-bit input (range [{low}, {high}]), "
            f"over Concrete's {MAX_TLU_BIT_WIDTH}-bit limit ({len(self.too_wide)} lookup(s) too "
            "wide). fhe='disable' runs it in the clear; for a circuit lower it with the option "
            f"'rounding_threshold_bits' (e.g. 6) or a smaller 'n_bits' (now {self.settings.n_bits})"
        )

    def calibrate_rounding(self, q_inputs: Sequence[np.ndarray]) -> Dict[str, Tuple[int, int]]:
        """Run on the quantized inputset; size each lookup's rounding; check bit-widths.

        Returns the integer input range of each lookup as it sees it (centered when that saves a bit).
        With the option `precision_search`, the partition searches the bit-widths first
        (`precision_search.search_precision`).
        """
        self.rounding_lsbs = {}
        self.recording = {}
        self.lookup_offsets = {}
        self.lookup_shifts = {}
        self.output_bias_bits, self._bias_widths, self.output_widths = {}, {}, {}
        try:
            self(*q_inputs)
            raw_ranges = dict(self.recording)
        finally:
            self.recording = None
        ranges = self._size_rounding(q_inputs, raw_ranges, search=True)
        for _ in range(ROUNDED_CALIBRATION_PASSES):
            if not self.rounding_lsbs:
                break
            # Concrete measures each lookup's input with the lookups before it rounded, which
            # moves it by a few of their steps (the digits CNN's second lookup: top 1061, not
            # 1069, under a top placed at 2**11 to widen it by a bit, so Concrete saw no extra
            # bit and the rounding carried): place again on the ranges the lookups now have,
            # until they hold (one pass per lookup depth)
            measured = self._lookup_input_ranges(q_inputs)
            if all(raw_ranges.get(key) == value for key, value in measured.items()):
                break
            raw_ranges = {**raw_ranges, **measured}
            ranges = self._size_rounding(q_inputs, raw_ranges, search=False)
        return ranges

    def _lookup_input_ranges(self, q_inputs: Sequence[np.ndarray]) -> Dict[str, Tuple[int, int]]:
        """Each lookup's input range (before its offset) on the inputset, in a run of the
        program as it stands (rounded lookups included, no slips)."""
        seen: Dict[str, Tuple[int, int]] = {}

        def observe(key: str, expr: Any, _table: Any) -> None:
            low, high = int(np.min(expr)), int(np.max(expr))
            old = seen.get(key, (low, high))
            seen[key] = (min(low, old[0]), max(high, old[1]))

        self._run_observing(observe, q_inputs)
        return seen

    def _size_rounding(
        self, q_inputs: Sequence[np.ndarray], raw_ranges: Dict[str, Tuple[int, int]], search: bool
    ) -> Dict[str, Tuple[int, int]]:
        """Place each lookup's input and size its rounding on the lookups' raw input ranges
        ("auto" rounding: searched when `search`, else kept); returns the placed ranges."""
        rounding = self.settings.rounding_threshold_bits
        auto = rounding is not None and rounding.auto
        self.lookup_offsets, self.lookup_shifts = {}, {}
        if search or not auto:
            self.rounding_lsbs = {}
        self._place_lookups(raw_ranges)
        ranges = self._placed(raw_ranges)
        if auto and search:
            self._search_rounding(q_inputs, ranges)
        for key, (low, high) in ranges.items():
            bits = bit_width(low, high)
            kept = self.lookup_precision.get(key, rounding.n_bits) if rounding is not None else None
            if rounding is not None and not rounding.auto and bits > int(kept):
                self.rounding_lsbs[key] = bits - int(kept)
        self._place_lookups(raw_ranges)  # now with room for the rounding chosen
        ranges = self._placed(raw_ranges)
        if rounding is not None and not rounding.auto:  # the final placement sets the widths:
            for key in self.rounding_lsbs:  # Concrete keeps the wider of raw and placed
                bits = _seen_width(ranges[key], raw_ranges[key])
                kept = self.lookup_precision.get(key, rounding.n_bits)
                self.rounding_lsbs[key] = max(1, bits - int(kept))
        if self._approximate:
            self._keep_two_bits(ranges)
        if self.rounding_lsbs:
            self._leave_room_on_top(raw_ranges, ranges)
            ranges = self._placed(raw_ranges)
        self.too_wide = []
        for key, (low, high) in ranges.items():
            effective = _seen_width((low, high), raw_ranges[key]) - self.rounding_lsbs.get(key, 0)
            if effective > MAX_TLU_BIT_WIDTH:
                self.too_wide.append((key.split(":")[0], effective, low, high))
        if self.qat and ranges and self.qat_bias_bits is None:
            self._narrow_bias(ranges, raw_ranges, 0 if self.rounding_lsbs else QAT_UNROUNDED_OUTPUT_SLACK)
        if self.qat and self.rounding_grid == ALIGNED_GRID:
            self._align_rounding(q_inputs, raw_ranges, ranges)
        elif (
            self.qat or self.rounding_grid == ZERO_GRID or (rounding is not None and not rounding.approximate)
        ):
            self._round_through_zero(raw_ranges, ranges)
        self.capacity = {
            key: self._lookup_capacity(key, placed, raw_ranges[key])
            for key, placed in self._placed(raw_ranges).items()
        }
        return ranges

    def _lookup_capacity(self, key: str, placed: Tuple[int, int], raw: Tuple[int, int]) -> Tuple[int, int]:
        """What a lookup's placed input holds: the type Concrete gives it (its per-position
        shifts included) and, when it is rounded, no more than its rounding's top at the placed
        width (above it the rounding carries and wraps around, `_leave_room_on_top`).

        An unrounded lookup whose placed range needs at most
        `optimize_tlu_based_on_original_bit_width` bits (Concrete's option, 8 by default) is
        read at that width, not at the wider one its input shares with the value it was
        computed from: Concrete multiplies the input up and reinterprets it narrower (random
        graph 57: a lookup placed on [-49, 47] read -67 as 61, with its input typed int8).
        """
        shift = self.lookup_shifts.get(key)
        shifted = placed
        if shift is not None:  # aligned QAT rounding
            shifted = (placed[0] + min(int(np.min(shift)), 0), placed[1] + max(int(np.max(shift)), 0))
        lsbs = self.rounding_lsbs.get(key)
        width = _seen_width(shifted, raw)
        if not lsbs and self._reads_at_own_width(bit_width(*shifted)):
            width = bit_width(*shifted)
        low, high = _type_range(shifted, width)
        if lsbs:
            high = min(high, _rounding_top(bit_width(*placed), lsbs, self._approximate))
        return low, high

    def _reads_at_own_width(self, bits: int) -> bool:
        """Whether Concrete reads a lookup input of `bits` bits (from its own range) at that
        width (`optimize_tlu_based_on_original_bit_width`: a bound, or True / False)."""
        narrowing = getattr(self.settings.configuration, "optimize_tlu_based_on_original_bit_width", 8)
        return bool(narrowing) if isinstance(narrowing, bool) else bits <= int(narrowing)

    @property
    def _approximate(self) -> bool:
        rounding = self.settings.rounding_threshold_bits
        return rounding is not None and rounding.approximate

    def _shift_room(
        self, key: str, raw_ranges: Dict[str, Tuple[int, int]], ranges: Dict[str, Tuple[int, int]]
    ) -> int:
        """The largest clear shift a rounded lookup's input can take on top of its placement
        without growing (rounding's carry and approximate slips included), at most one rounding
        step minus 1."""
        lsbs = self.rounding_lsbs[key]
        bits = bit_width(*ranges[key])  # Concrete's carry check: the placed value's own width
        return min(2**lsbs - 1, _rounding_top(bits, lsbs, self._approximate) - ranges[key][1])

    def _leave_room_on_top(
        self, raw_ranges: Dict[str, Tuple[int, int]], ranges: Dict[str, Tuple[int, int]]
    ) -> None:
        """Keep each rounded lookup's input below `_rounding_top`: its rounding never carries
        past its width.

        Where exact rounding of the largest value carries, Concrete 2.11 widens the rounded
        value by a bit: for exact rounding one more lookup (a 1-bit rounding becomes a table)
        or a wider one; for approximate rounding it resizes the lookup's table, which fails for
        per-channel tables ("could not broadcast input array from shape (32,) into shape
        (64,)": the digits CNN at op_weights 4 and 6-bit lookups). Approximate rounding's
        one-step slip up is not widened for: where it passes the width it wraps around to 0,
        and the lookup reads its smallest input instead of its largest (an encoder's whole
        token off by 4 to 10 in about one simulate run in three). Where the top is too close,
        the input moves down into the room below (staying non-negative, same width); where
        that room is too small, it moves up past the next power of two, so Concrete sees one
        more bit and rounds one more bit away.

        The width is the placed value's own, not the wider type Concrete gives it
        (`_seen_width`): Concrete detects a carry where the rounded value's range is wider
        than its input's, and a raw signed accumulator is often a bit wider than its placement
        (a lopsided [-676, 1135] placed at [227, 2038]: 2038 rounds up to 2**11).
        """
        for key, lsbs in list(self.rounding_lsbs.items()):
            bits = bit_width(*ranges[key])
            deficit = ranges[key][1] - _rounding_top(bits, lsbs, self._approximate)
            if deficit <= 0:
                continue
            if deficit <= self._room_below(key, raw_ranges, ranges):
                self.lookup_offsets[key] = self.lookup_offsets.get(key, 0) - deficit
            else:
                self.lookup_offsets[key] = 2**bits - raw_ranges[key][1]
                self.rounding_lsbs[key] = lsbs + 1

    def _keep_two_bits(self, ranges: Dict[str, Tuple[int, int]]) -> None:
        """Approximately rounded lookups keep at least 2 bits of their placed width: with 1,
        every placement's top lies in the last rounding step but one (`_rounding_top` is below
        2**(bits - 2)), where a slip up wraps around to 0, and moving the input up a power of
        two keeps that one bit. Reached with `rounding_threshold_bits` 2 on a lopsided
        accumulator, which keeps a bit less than asked."""
        for key, lsbs in list(self.rounding_lsbs.items()):
            most = bit_width(*ranges[key]) - 2
            if most < 1:
                del self.rounding_lsbs[key]
            elif lsbs > most:
                self.rounding_lsbs[key] = most

    def _round_through_zero(
        self, raw_ranges: Dict[str, Tuple[int, int]], ranges: Dict[str, Tuple[int, int]]
    ) -> None:
        """Put 0 on each rounded lookup's grid: a clear shift (leveled, free) makes the
        placement's offset a multiple of the rounding step, so the accumulator itself is rounded
        to the nearest multiple of the step, as Concrete ML rounds. Up where the room left on
        top allows it, else down where the room below does (approximate rounding leaves less
        room on top, `_rounding_top`): the lookup keeps its width.

        Exact rounding always rounds through 0: at equal bits it then rounds the same values
        the same way as Concrete ML (digits CNN at exact 6: 0.958 test accuracy, Concrete ML
        0.949; 0.940 with the calibration's phase). Approximate rounding keeps the phase the
        placement gives unless `rounding_grid` is ZERO_GRID, which `precision_search` tries:
        through 0, random networks showed the same mean error in `disable` and single margins
        moved both ways (a small conv net's worst output went from 3.9 to 5.0 quantization
        steps), while the digits CNN at 5-bit lookups gained about a point in `simulate`
        (0.939 -> 0.949 at p_error 2**-40 over 5 runs; `disable` 0.944 both), where
        approximate rounding's slips count. A QAT program rounds through 0 when the search
        picks `ZERO_GRID`.
        """
        for key, lsbs in self.rounding_lsbs.items():
            if key not in ranges:
                continue
            shift = (-self.lookup_offsets.get(key, 0)) % 2**lsbs
            if 0 < shift <= self._shift_room(key, raw_ranges, ranges):
                self.lookup_shifts[key] = np.asarray(shift, dtype=np.int64)
            elif shift and self._room_below(key, raw_ranges, ranges) >= 2**lsbs - shift:
                self.lookup_shifts[key] = np.asarray(shift - 2**lsbs, dtype=np.int64)

    def _room_below(
        self, key: str, raw_ranges: Dict[str, Tuple[int, int]], ranges: Dict[str, Tuple[int, int]]
    ) -> int:
        """How far a rounded lookup's input can move down from its placement: staying
        non-negative, and as wide as Concrete sees it now."""
        low, high = ranges[key]
        raw_bits = bit_width(*raw_ranges[key])
        if raw_bits >= bit_width(low, high):
            return low  # the raw accumulator sets the width
        return min(low, high - 2 ** (bit_width(low, high) - 1))

    def _align_rounding(
        self,
        q_inputs: Sequence[np.ndarray],
        raw_ranges: Dict[str, Tuple[int, int]],
        ranges: Dict[str, Tuple[int, int]],
    ) -> None:
        """QAT: shift each rounded lookup's input, position by position, so that its rounding
        grid falls where its table changes value.

        A QAT lookup is a step function (a 3-bit QuantReLU has 3 thresholds) over a much wider
        accumulator; rounding away `lsbs` bits puts 2**lsbs neighbouring accumulators in one
        bucket, and a bucket that straddles a threshold gives some of them the wrong level.
        A clear constant added before the rounding (leveled, free) moves the bucket edges: for
        each position, the shift in [0, 2**lsbs) with the smallest total |table(rounded) -
        table(exact)| over the inputset. One run of the program: each lookup is aligned when
        the run reaches it, so it sees the earlier ones aligned. Shifts stay within the room the
        placement left on top (the lookup keeps its width, rounding's carry included); the
        batch must lie on dim 0.

        With `rounding_grid` ZERO_GRID the program rounds through 0 instead, as exactly
        rounded programs do (`_round_through_zero`): that grid agrees less with the QuantReLU's
        thresholds, but on the digits QAT network it is the more accurate one, on training and
        test data alike.
        """
        samples = len(q_inputs[0]) if q_inputs else 0

        def align(key: str, expr: Any, table: Any) -> None:
            lsbs = self.rounding_lsbs.get(key, 0)
            if not lsbs or key in self.lookup_shifts or key not in ranges:
                return
            widest_shift = self._shift_room(key, raw_ranges, ranges)
            if widest_shift <= 0 or not isinstance(expr, np.ndarray) or expr.ndim < 2 or len(expr) != samples:
                return
            offset = self.lookup_offsets.get(key, 0)
            # the table once per position over the inputs' span (and rounding's reach around it)
            low, high = int(expr.min()) - 2**lsbs, int(expr.max()) + 2**lsbs
            grid = np.arange(low, high + 1).reshape((-1,) + (1,) * (expr.ndim - 1))
            values = np.asarray(
                table(np.ascontiguousarray(np.broadcast_to(grid, (high - low + 1,) + expr.shape[1:])))
            )
            exact = np.take_along_axis(values, expr - low, axis=0)
            costs = []
            for shift in range(widest_shift + 1):
                rounded = np.asarray(fhe.round_bit_pattern(expr + (offset + shift), lsbs_to_remove=lsbs))
                looked_up = np.take_along_axis(values, rounded - offset - shift - low, axis=0)
                costs.append(np.abs(looked_up - exact).sum(axis=0))
            best = np.argmin(np.stack(costs), axis=0)  # ties: the smallest shift
            if np.any(best):
                self.lookup_shifts[key] = best.astype(np.int64)

        self._run_observing(align, q_inputs)


def public_output(
    value: Encrypted, precision_bits: int, bias_bits: int = 0, joined: bool = False
) -> Tuple[Any, Any]:
    """An affine output as the client may read it: (integer expression, scale), zero-point 0.

    The client dequantizes with what it is given: a float zero-point (where a bias ends up)
    would tell it the bias, per-position scales each row's largest weight or a per-channel
    constant. The zero-point, rounded, is subtracted inside the circuit (error at most half a
    step of the scale). Per-channel weight scales were already made one at their source
    (`IntegerProgram._one_output_scale`). Other per-position scales (a constant vector
    multiplied in, a norm's gain) of a circuit without lookups are brought onto one scale S, the
    smallest |scale| over 2**precision_bits, by clear integer multipliers rint(scale / S):
    leveled, the output grows by precision_bits plus log2 of the scales' spread, the error is
    at most |y| * 2**-(precision_bits + 1) + S / 2. `joined`: the per-position scales are those
    of joined parts (a torch.cat of an activation and an input): kept, one per part.
    With `bias_bits`, the step is first made 2**bias_bits times finer (the integer multiplied)
    so that the bias is rounded on it.
    """
    scale = np.asarray(value.scale, dtype=np.float64)
    expr = value.expr
    common: Any
    if joined and np.ndim(scale) and np.ptp(scale) > 0:
        common = scale
    elif np.ndim(scale) and np.ptp(scale) > 0:
        common = float(np.min(np.abs(scale))) / 2**precision_bits
        expr = expr * np.rint(scale / common).astype(np.int64)
    else:
        common = float(scale.reshape(-1)[0]) if scale.size else 1.0
    if bias_bits:
        expr, common = expr * 2**bias_bits, common / 2**bias_bits
    offset = np.rint(np.asarray(value.zero_point, dtype=np.float64) * scale / common).astype(np.int64)
    if np.any(offset):
        expr = expr - (offset if np.ndim(offset) else int(offset))
    return expr, common


def _fractional_bias(value: Encrypted) -> bool:
    """Whether a uniformly scaled output's zero-point (its bias) falls off the integer grid."""
    scale = np.asarray(value.scale, dtype=np.float64)
    zero_point = np.asarray(value.zero_point, dtype=np.float64)
    uniform = not (np.ndim(scale) and np.ptp(scale) > 0)  # else public_output multiplies anyway
    return uniform and bool(np.any(np.abs(zero_point - np.rint(zero_point)) > 1e-6))


def _scale_spread(value: Any) -> float:
    """Largest over smallest |scale| of an affine encrypted value (1.0 when uniform)."""
    if not is_encrypted(value) or not value.affine or not np.ndim(value.scale):
        return 1.0
    scale = np.abs(np.asarray(value.scale, dtype=np.float64))
    low = float(scale.min()) if scale.size else 1.0
    return float(scale.max()) / low if low > 0 else math.inf


def _rounding_top(bits: int, lsbs: int, approximate: bool) -> int:
    """The largest input of a `bits`-bit value whose rounding by `lsbs` bits stays within
    `bits` bits: exact rounding carries up to half a step; approximate rounding may then slip
    one step more (Concrete's simulation: inputs whose nearest multiple is the last one below
    2**bits wrap around to 0), so its nearest multiple must be one step lower still."""
    if not approximate:
        return 2**bits - 1 - 2 ** (lsbs - 1)
    return 2**bits - 2 ** (lsbs + 1) + 2 ** (lsbs - 1) - 1


def _type_range(bounds: Tuple[int, int], width: int) -> Tuple[int, int]:
    """The integers a `width`-bit value holds: unsigned when `bounds` are non-negative."""
    return (0, 2**width - 1) if bounds[0] >= 0 else (-(2 ** (width - 1)), 2 ** (width - 1) - 1)


def _seen_width(placed: Tuple[int, int], raw: Tuple[int, int]) -> int:
    """The width Concrete gives a lookup's input: a clear offset's addition takes the width of
    its encrypted operand, so the wider of the placed range and the raw accumulator's."""
    return max(bit_width(*placed), bit_width(*raw))


def _lookup_offset(low: int, high: int, lsbs: int) -> int:
    """The clear integer added before a lookup whose input spans [low, high] on the inputset.

    A lookup after rounding is shifted to non-negative inputs instead (see below).
    Centering a lopsided range on 0 can save a bit of the lookup's input (e.g. [-20000, 3000]:
    16 -> 15 bits), which halves the step of its rounding for free. It is done only when
    CENTERING_MARGIN of the span still fits on both sides (inputs outside the calibration
    range must not wrap around), with at least 2**(lsbs - 1) of room on top so that rounding
    away `lsbs` bits never carries past the largest value. 0 when centering saves nothing.
    """
    middle, margin = (low + high) // 2, int(np.ceil(CENTERING_MARGIN * (high - low)))
    if lsbs:
        # a rounded lookup reads a non-negative input: Concrete 2.11 simulates exact rounding of
        # signed values wrongly (e.g. [-17, 8] rounded by 3 bits then looked up: 18 of 26 values
        # differ from its own graph evaluation), while the unsigned shift never costs a bit.
        # (A tighter margin that kept a signed range's bits made simulate differ from disable
        # again: on a TransformerEncoderLayer by 0.70 against 0.23, at p_error 2**-40.)
        return max(0, margin - low)
    bits = bit_width(low - middle - margin, high - middle + margin)
    if bits >= bit_width(low, high):
        return 0
    top = 2 ** (bits - 1) - 1
    slack = 2**bits - 1 - (high - low)
    room = min(slack, max((slack + 1) // 2, 2 ** (lsbs - 1) if lsbs else 0))
    return top - room - high


def _output_error(program: "IntegerProgram", q_inputs, reference, spans) -> float:
    """Worst mean absolute output error, as a share of each output's span."""
    outputs = program.dequantize_outputs(*as_tuple(program(*q_inputs)))
    return max(float(np.mean(np.abs(out - ref))) / span for out, ref, span in zip(outputs, reference, spans))


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)
