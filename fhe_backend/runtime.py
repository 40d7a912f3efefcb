"""An FHE partition at run time: calibration, its integer program and the run modes.

`FhePartition` replaces one fused subgraph of the model. It quantizes its torch inputs, runs
the integer program in a mode, and dequantizes: ``disable`` (the program in the clear, whole
batch at once), ``simulate`` and ``execute`` (through its `CircuitRunner`: the Concrete
circuit, its keys and the executors), ``torch`` (the original float subgraph). Switching modes
never recompiles.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import logging
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx as fx
from concrete import fhe

from .circuit_runner import CircuitRunner, Sample
from .errors import (
    CONCRETE_COMPILE_ERRORS,
    FheBackendError,
    LoweringError,
    NoParametersFoundError,
    NotCompiledError,
    OptionError,
)
from .graph_utils import as_tuple, fetch_attr, node_label, output_nodes
from .quantization.calibration import NodeStats, StatsRecorder
from .quantization.precision_search import search_precision
from .quantization.program import IntegerProgram
from .quantization.quantizers import bit_width, decryption_window
from .settings import AUTO, FHE_MODES, MAX_TLU_BIT_WIDTH, FheSettings, Rounding

logger = logging.getLogger("fhe_backend")

RUN_MODES = FHE_MODES + ("remote",)

# a mode for the calls made inside `fhe_mode(...)`, in this thread/task only
_MODE_OVERRIDE: "contextvars.ContextVar[Optional[str]]" = contextvars.ContextVar(
    "fhe_backend_mode", default=None
)


@contextlib.contextmanager
def fhe_mode(mode: Any):
    """Run every FHE partition called inside the block in `mode`, in this thread only.

    ``with fhe_backend.fhe_mode("simulate"): y = compiled(x)``. The partitions' own modes (set
    with `set_fhe_mode`) are untouched, so threads calling one compiled model each get their
    own mode's results.
    """
    mode = getattr(mode, "value", mode)
    if mode not in RUN_MODES + ("calibrate",):
        raise OptionError(f"FHE mode {mode!r}: allowed modes are {RUN_MODES}")
    token = _MODE_OVERRIDE.set(mode)
    try:
        yield
    finally:
        _MODE_OVERRIDE.reset(token)


class FhePartition(torch.nn.Module):
    """One FHE subgraph of a model: a concrete circuit plus its quantizers."""

    def __init__(
        self,
        name: str,
        graph_module: fx.GraphModule,
        settings: FheSettings,
        encryption_status: Sequence[str],
        module_path: str = "",
    ):
        super().__init__()
        self.name = name
        self.graph_module = graph_module
        self._settings = settings
        self.module_path = module_path
        self.encryption_status = tuple(encryption_status)
        self._mode = settings.fhe
        object.__setattr__(self, "primary", None)  # an equal partition compiled before (not a submodule)
        self.stats: Dict[str, NodeStats] = {}
        self.program: Optional[IntegerProgram] = None
        self.runner = CircuitRunner(name, settings, self.encryption_status)
        self.calibration_batch_size: Optional[int] = None
        self.rows_per_sample: List[int] = []
        self.lookup_ranges: Dict[str, Tuple[int, int]] = {}
        self.remote_runner: Optional[Callable[..., Any]] = (
            None  # set by hybrid deployment: q_inputs -> q_outputs
        )
        # (samples in the batch or None when unknown, the partition's tensor inputs) per batch
        self._calibration_inputs: List[Tuple[Optional[int], List[torch.Tensor]]] = []
        self._deferred_inputs: Optional[List[np.ndarray]] = None  # see defer_circuit
        # the CompileSession of the graph (a weak reference, set by the backend): the partitions
        # its other graphs hold for this one (other batch sizes) round as this one does
        self.session_ref: Optional[Callable[[], Any]] = None
        self._clip_warned = False
        self._wrap_warned = False
        self._ran_in_the_clear = False  # whether `disable` results were returned (see compile_circuit)
        # seconds the last circuit compilation took (its checks and any retry included)
        self.compile_seconds: Optional[float] = None

    @property
    def settings(self) -> FheSettings:
        """The partition's settings (its circuit runner always compiles and runs with these)."""
        return self._settings

    @settings.setter
    def settings(self, value: FheSettings) -> None:
        self._settings = self.runner.settings = value

    # ---- modes --------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """The run mode: disable, simulate, execute, torch (or remote, set by deployment).

        Inside a `fhe_mode(...)` block, that block's mode.
        """
        override = _MODE_OVERRIDE.get()
        if override is not None:
            return override
        return self.primary.mode if self.primary is not None else self._mode

    @mode.setter
    def mode(self, value: Any) -> None:
        value = getattr(value, "value", value)
        if self.primary is not None:
            self.primary.mode = value
            return
        if value not in RUN_MODES + ("calibrate",):
            raise OptionError(f"FHE mode {value!r}: allowed modes are {RUN_MODES}")
        if value == "remote" and self.remote_runner is None:
            raise OptionError(
                f"partition '{self.name}': mode 'remote' needs a client "
                "(use fhe_backend.hybrid_model.HybridFHEModel)"
            )
        self._mode = value

    @property
    def compiled(self) -> bool:
        """True once the circuit exists."""
        if self.primary is not None:
            return self.primary.compiled
        return self.runner.circuit is not None or self._deferred_inputs is not None

    @property
    def circuit(self) -> Optional[fhe.Circuit]:
        """The Concrete circuit (compiled on first use when it was deferred, see defer_circuit)."""
        if self.primary is not None:
            return self.primary.circuit
        if self.runner.circuit is None and self._deferred_inputs is not None:
            self.compile_circuit(self._deferred_inputs)
            self._deferred_inputs = None
        return self.runner.circuit

    @property
    def keygen_seconds(self) -> Optional[float]:
        """Seconds the last key generation (or key cache load) took."""
        return self.runner.keygen_seconds

    @property
    def has_calibration_data(self) -> bool:
        """True while calibration batches are recorded and not yet quantized."""
        return bool(self._calibration_inputs)

    @property
    def calibrated(self) -> bool:
        """True once the integer program exists (the circuit may still be deferred)."""
        if self.primary is not None:
            return self.primary.calibrated
        return self.program is not None

    # ---- calibration and compilation ----------------------------------------------------

    def tensor_args(self, args: Sequence[Any]) -> List[torch.Tensor]:
        """The tensor inputs among the partition's arguments (symbolic sizes are skipped)."""
        return [a for a in args if isinstance(a, torch.Tensor)]

    def calibrate(self, *args: Any) -> Any:
        """Run in float on one calibration batch, recording ranges and inputs."""
        tensors = self.tensor_args(args)
        self._calibration_inputs.append((self.calibration_batch_size, [t.detach() for t in tensors]))
        return StatsRecorder(self.graph_module, self.stats).run(*args)

    def compile(self, circuit: bool = True) -> None:
        """Build the integer program from the recorded statistics and compile the circuit.

        With `circuit=False` only the program is built (the disable mode works). A program with
        lookups wider than Concrete allows, in mode `disable`, gets its circuit deferred
        (`defer_circuit`) instead of failing: it runs in the clear.
        """
        overrides = self._session_fallbacks().get(self._fallback_key())
        if overrides:  # another graph's copy of this partition fell back (_share_fallback)
            self.settings = dataclasses.replace(self.settings, **overrides)
        q_inputs = self.quantize()
        if not circuit:
            return
        if self.mode == "disable":  # the circuit is compiled when a mode first needs it
            self.defer_circuit(q_inputs)
            return
        self.compile_circuit(q_inputs)

    def quantize(self) -> List[np.ndarray]:
        """Build the integer program from the recorded statistics, without compiling a circuit.

        Returns the quantized calibration inputs (batch-major), the circuit's inputset.
        """
        if not self._calibration_inputs:
            raise NotCompiledError(f"partition '{self.name}' has no calibration data")
        self.rows_per_sample = self._rows_per_sample()
        self.program = IntegerProgram(self.graph_module, self.stats, self.settings, self.encryption_status)
        columns = list(zip(*[tensors for _, tensors in self._calibration_inputs]))
        q_inputs = [
            np.concatenate(q)
            for q in zip(*[self.program.quantize_inputs(*[torch.cat(col) for col in columns])])
        ]
        self.lookup_ranges = self._calibrate_rounding(q_inputs)
        self._calibration_inputs = []
        return q_inputs

    def _rows_per_sample(self) -> List[int]:
        """Rows of dim 0 each input holds per sample, from every calibration batch's own size.

        Batches of different sizes must agree (a view of (seq, batch*heads, d) has `heads` rows
        per sample whatever the batch); a disagreement or an uneven split is an error.
        """
        found = set()
        for samples, tensors in self._calibration_inputs:
            samples = samples or tensors[0].shape[0]
            rows = []
            for tensor in tensors:
                count, rest = divmod(tensor.shape[0], samples) if tensor.dim() else (1, 0)
                if rest:
                    raise LoweringError(
                        f"partition '{self.name}' ({self.module_path or 'model'}): an input of "
                        f"{tensor.shape[0]} rows does not split into {samples} samples; FHE circuits "
                        "run one sample at a time and need the batch on dim 0"
                    )
                rows.append(max(1, count))
            found.add(tuple(rows))
        if len(found) != 1:
            raise LoweringError(
                f"partition '{self.name}': calibration batches give different rows "
                f"per sample {sorted(found)}; its inputs do not keep the batch on dim 0"
            )
        return list(found.pop())

    def compile_circuit(self, q_inputs: Sequence[np.ndarray], artifacts: Any = None) -> None:
        """Compile the integer program into a circuit on a quantized, batch-major inputset.

        `artifacts` (a `concrete.fhe.DebugArtifacts`) collects Concrete's graphs and MLIR. When
        Concrete finds no crypto parameters for the program, it is rebuilt narrower and compiled
        again, with a warning each time (`_no_parameters_fallback`): unrounded lookups are
        rounded (`rounding_threshold_bits="auto"`), then average pools' window sums are
        requantized (`pool_sum_bits=0`), then output layers give up their extra weight bits one
        at a time (`output_extra_weight_bits`). When nothing is left to narrow, a BitWidthError
        names the widest lookups and what lowers them.
        """
        start = time.perf_counter()
        self.program.check_circuit_bit_widths()
        while True:
            try:
                self._concrete_compile(q_inputs, artifacts)
                break
            except FheBackendError:
                raise  # ours, already saying what to change
            except CONCRETE_COMPILE_ERRORS as error:
                if "NoParametersFound" not in str(error):
                    raise self._concrete_error(error) from error
                fallback = self._no_parameters_fallback()
                if fallback is None:
                    raise self._no_parameters_error() from error
            overrides, change = fallback
            earlier = (
                "; the 'disable' results it returned before came from the program before this change"
                if self._ran_in_the_clear
                else ""
            )
            warnings.warn(
                f"fhe_backend: partition '{self.name}' ({self.module_path or 'model'}): Concrete "
                f"found no crypto parameters (lookups: {self._widest_lookups()}); retrying with "
                f"{change}{earlier}",
                stacklevel=3,
            )
            self._reprogram(dataclasses.replace(self.settings, **overrides), q_inputs)
            self._share_fallback(overrides)
        self._note_output_windows()
        self.compile_seconds = time.perf_counter() - start
        if self.settings.verbose or logger.isEnabledFor(logging.INFO):  # statistics cost seconds
            self._log(f"compiled in {self.compile_seconds:.2f}s: {self.statistics}")

    def _note_output_windows(self) -> None:
        """Each circuit output decrypts modulo a power of two that the type Concrete gave it
        sets; the integers it stands for are that many, centered on its range on the inputset
        (`decryption_window`). So a value an approximate rounding's slip or a bootstrap error
        takes a little past its calibrated range decrypts right, and beyond the window a clear
        run warns that it wraps (see `IntegerProgram.set_output_window`)."""
        circuit_outputs = self.circuit.graph.ordered_outputs()
        for index, (node, circuit_output) in enumerate(zip(output_nodes(self.graph_module), circuit_outputs)):
            dtype = circuit_output.output.dtype
            if not circuit_output.output.is_encrypted or circuit_output.bounds is None:
                continue
            low, high = (int(bound) for bound in circuit_output.bounds)
            window = decryption_window(low, high, int(dtype.bit_width), bool(dtype.is_signed))
            self.program.set_output_window(index, node.name, window)

    def _no_parameters_fallback(self) -> Optional[Tuple[Dict[str, Any], str]]:
        """The next narrower settings to try after NoParametersFound, as (setting overrides,
        what they change in words), or None when there is nothing left to narrow."""
        if self.settings.rounding_threshold_bits is None:
            return {"rounding_threshold_bits": Rounding.parse(AUTO)}, "rounding_threshold_bits='auto'"
        if self.program.pool_sums:
            pools = ", ".join(f"'{name}'" for name in sorted(self.program.pool_sums))
            return {"pool_sum_bits": 0}, (
                f"pool_sum_bits=0: the window sums of {pools} are requantized by a lookup before "
                "the next linear op reads them (narrower accumulators, more lookups)"
            )
        extra = self.program.one_scale_nodes
        if max(extra.values(), default=0) > 0:
            bits = max(extra.values()) - 1
            layers = ", ".join(f"'{name}'" for name, taken in extra.items() if taken > bits)
            return {"output_extra_weight_bits": bits}, (
                f"output_extra_weight_bits={bits}: the output layer(s) {layers}, which take "
                f"per-tensor weights, keep {bits} extra weight bit(s) instead of {max(extra.values())} "
                "(coarser weights in rows of small scale)"
            )
        return None

    def _concrete_compile(self, q_inputs: Sequence[np.ndarray], artifacts: Any) -> fhe.Circuit:
        return self.runner.compile(self.program, q_inputs, self._samples(q_inputs), artifacts)

    def _calibrate_rounding(self, q_inputs: Sequence[np.ndarray]) -> Dict[str, Tuple[int, int]]:
        """The program's lookup ranges on the inputset, its bit-widths searched first when the
        option `precision_search` is set."""
        if self.settings.precision_search is not None:
            search_precision(
                self.program, q_inputs, lambda program: self._candidate_circuit(program, q_inputs)
            )
        return self.program.calibrate_rounding(q_inputs)

    def _candidate_circuit(self, program: IntegerProgram, q_inputs: Sequence[np.ndarray]) -> fhe.Circuit:
        """A precision-search candidate compiled with this partition's settings (no keys; the
        partition's own circuit is untouched)."""
        runner = CircuitRunner(self.name, self.settings, self.encryption_status)
        return runner.compile(program, q_inputs, self._samples(q_inputs), simulation=False)

    def _fallback_key(self) -> Tuple[str, str]:
        return (self.name, self.module_path)

    def _session(self) -> Any:
        return self.session_ref() if self.session_ref is not None else None

    def _session_fallbacks(self) -> Dict[Tuple[str, str], Dict[str, Any]]:
        session = self._session()
        return session.fallbacks if session is not None else {}

    def _share_fallback(self, overrides: Dict[str, Any]) -> None:
        """After this partition fell back to narrower settings (`overrides`): the session's
        other graphs (other batch sizes) take them too, those compiled later from the start, so
        that a sample gives the same result in every batch (their programs are rebuilt while
        their circuits are still to be compiled; one compiled already keeps its circuit)."""
        session = self._session()
        if session is None:
            return
        key = self._fallback_key()
        session.fallbacks[key] = {**session.fallbacks.get(key, {}), **overrides}
        for graph in session.compiled_graphs():
            for other in graph.partitions:
                if (
                    other is not self
                    and other.primary is None
                    and other._fallback_key() == key
                    and other._deferred_inputs is not None
                    and any(getattr(other.settings, name) != value for name, value in overrides.items())
                ):
                    settings = dataclasses.replace(other.settings, **overrides)
                    other._reprogram(settings, other._deferred_inputs)

    def _reprogram(self, settings: FheSettings, q_inputs: Sequence[np.ndarray]) -> None:
        """Rebuild the integer program under other settings (same statistics and inputs)."""
        self.settings = settings
        self.program = IntegerProgram(self.graph_module, self.stats, settings, self.encryption_status)
        self.lookup_ranges = self._calibrate_rounding(q_inputs)
        self.program.check_circuit_bit_widths()

    def _lookup_widths(self) -> List[Tuple[int, str]]:
        """(bits read after rounding, lookup key) of every lookup, widest first."""
        return sorted(
            (
                (bit_width(low, high) - self.program.rounding_lsbs.get(key, 0), key)
                for key, (low, high) in self.lookup_ranges.items()
            ),
            reverse=True,
        )

    def _widest_lookups(self, count: int = 3) -> str:
        widths = self._lookup_widths()
        return ", ".join(f"{bits} bits at '{key.split(':')[0]}'" for bits, key in widths[:count]) or "none"

    def _concrete_error(self, error: Exception) -> LoweringError:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return LoweringError(
            f"Concrete could not compile partition '{self.name}' ({self.module_path or 'model'}): "
            f"{first_line}. Its widest lookups: {self._widest_lookups()}; n_bits {self.settings.n_bits}, "
            f"rounding {self.settings.rounding_threshold_bits}. Concrete's error is chained below; other "
            "'n_bits' or 'rounding_threshold_bits' may avoid it, and the option 'show_mlir' prints "
            "the MLIR it was given"
        )

    def _no_parameters_error(self) -> NoParametersFoundError:
        rounding = self.settings.rounding_threshold_bits
        if rounding is None or rounding.auto:
            widest = self._lookup_widths()[0][0] if self.lookup_ranges else 0
            kept = max(2, widest - 1)
            tried = " ('auto' was tried)" if rounding is not None else ""
            rounding_advice = f"a 'rounding_threshold_bits'{tried} such as {kept}"
        else:
            kept = max(2, int(rounding.n_bits) - 1)
            rounding_advice = f"a smaller 'rounding_threshold_bits' (now {rounding.n_bits}: try {kept}"
            if not rounding.approximate:
                rounding_advice += f", or {{'n_bits': {rounding.n_bits}, 'method': 'approximate'}}"
            rounding_advice += ")"
        n_bits = self.settings.n_bits.op_inputs
        return NoParametersFoundError(
            f"partition '{self.name}' ({self.module_path or 'model'}): Concrete found no crypto "
            f"parameters (NoParametersFound) for its {len(self.lookup_ranges)} lookup(s); widest: "
            f"{self._widest_lookups()} (rounding {rounding}, n_bits {self.settings.n_bits}). Lower "
            f"them with {rounding_advice}, a smaller 'n_bits' (now {n_bits}: try {max(2, n_bits - 1)}; "
            "encrypted multiplications such as attention scores, softmax and LayerNorm use lookups "
            "one bit wider than their operands, which rounding does not narrow), or a larger "
            f"'p_error' / 'global_p_error'{self._wide_output_advice()}"
        )

    def _wide_output_advice(self) -> str:
        """Where an output is wider than any lookup may be, it is the likely cause: Concrete
        encodes the lookups that feed an output at the output's width."""
        widths = self.program.output_widths
        if not widths or max(widths.values()) <= MAX_TLU_BIT_WIDTH:
            return ""
        name, bits = max(widths.items(), key=lambda item: item[1])
        return (
            f". Its output '{name}' is {bits} bits wide, and Concrete encodes the lookups that "
            "feed it at that width: fewer 'op_weights' or 'op_inputs' bits, or a smaller fan-in, "
            "narrow it"
        )

    def defer_circuit(self, q_inputs: Sequence[np.ndarray]) -> None:
        """Keep the circuit's inputset and compile only when a mode (or `statistics`) needs it.

        Used in mode `disable`: the program runs in the clear at any width; a program with
        lookups wider than Concrete allows warns here, and `simulate` / `execute` raise the
        BitWidthError with its advice.
        """
        self._deferred_inputs = list(q_inputs)
        if not self.program.too_wide:
            return
        node, bits, _, _ = max(self.program.too_wide, key=lambda item: item[1])
        warnings.warn(
            f"fhe_backend: partition '{self.name}' runs in the clear only (fhe='disable'): "
            f"its lookup at node '{node}' needs {bits} bits, over Concrete's limit; "
            "simulate/execute will raise BitWidthError",
            stacklevel=3,
        )

    def _samples(self, q_inputs: Sequence[np.ndarray]) -> List[Sample]:
        """Split batch-major integer inputs into per-sample tuples (an uneven split raises)."""
        count = q_inputs[0].shape[0] // self.rows_per_sample[0]
        if any(q.shape[0] != count * r for q, r in zip(q_inputs, self.rows_per_sample)):
            raise OptionError(
                f"partition '{self.name}': inputs with {[q.shape[0] for q in q_inputs]} rows do not "
                f"split into samples of {self.rows_per_sample} rows each (one circuit call per "
                "sample); pass whole samples, batch on dim 0"
            )
        return [
            tuple(q[i * r : (i + 1) * r] for q, r in zip(q_inputs, self.rows_per_sample))
            for i in range(count)
        ]

    # ---- keys ---------------------------------------------------------------------------

    def keygen(self, force: bool = False) -> None:
        """Generate (or load from `key_cache_dir`) the keys of the circuit, once."""
        self._require_compiled()
        if self.runner.keygen(force):
            self._log(f"keys ready in {self.keygen_seconds:.2f}s")

    # ---- running ------------------------------------------------------------------------

    def forward(self, *args: Any) -> Any:
        """Run the partition in its current mode on torch inputs."""
        if self.mode == "torch":
            return self.graph_module(*args)
        if self.primary is not None:
            return self.primary(*args)
        mode = self.mode
        if mode == "calibrate":
            return self.calibrate(*args)
        if not self.calibrated:
            warnings.warn(
                f"fhe_backend: partition '{self.name}' is calibrated on the first call's inputs only; "
                "pass a representative inputset (hundreds of samples) with options={'inputset': ...} "
                "for accuracy",
                stacklevel=2,
            )
            self.calibrate(*args)
            self.compile()
        tensors = self.tensor_args(args)
        self._warn_if_clipped(tensors)
        q_outputs = self.run_integers(self.program.quantize_inputs(*tensors), mode)
        outputs = self.program.dequantize_outputs(*q_outputs)
        return self._to_torch(outputs, tensors)

    def _warn_wraps(self, wraps: Sequence[Tuple[str, int, int, int, int]]) -> None:
        """Warn once when inputs drive a lookup's input, or an output, beyond the integers the
        circuit holds there."""
        if not wraps or self._wrap_warned:
            return
        self._wrap_warned = True
        key, low, high, capacity_low, capacity_high = wraps[0]
        is_output = key.startswith("output:")
        source = key.split(":")[1] if is_output else self.program.lookup_sources.get(key, key.split(":")[0])
        node = next((n for n in self.graph_module.graph.nodes if n.name == source), None)
        label = node_label(node) if node is not None else source
        where_it_wraps = (
            f"the output '{label}' is"
            if is_output
            else f"the lookup reading '{label}' (calibrated on {self.lookup_ranges.get(key)}) gets"
        )
        others = len({w[0] for w in wraps}) - 1
        warnings.warn(
            f"fhe_backend: partition '{self.name}': on these inputs {where_it_wraps} integers in "
            f"[{low}, {high}], beyond the [{capacity_low}, {capacity_high}] the circuit holds there"
            + (f" (and {others} other place(s))" if others else "")
            + ": under FHE (simulate/execute) such values wrap around and give wrong results "
            "where fhe='disable' does not. Calibrate on an inputset that covers these inputs "
            "(warned once)",
            stacklevel=3,
        )

    def _warn_if_clipped(self, tensors: Sequence[torch.Tensor]) -> None:
        """Warn once when inputs fall outside the calibration range (they are clipped)."""
        if self._clip_warned:
            return
        for node, quantizer, tensor in zip(
            self.program.tensor_inputs, self.program.input_quantizers, tensors
        ):
            count = quantizer.clipped(tensor.detach().cpu().numpy())
            if count:
                self._clip_warned = True
                stats = self.stats[node.name]
                warnings.warn(
                    f"fhe_backend: partition '{self.name}': {count} of {tensor.numel()} values of input "
                    f"'{node.name}' are outside the calibration range [{stats.low:.4g}, {stats.high:.4g}] "
                    "and are clipped; calibrate on a representative inputset that covers them "
                    "(warned once)",
                    stacklevel=3,
                )
                return

    def run_integers(
        self, q_inputs: Sequence[np.ndarray], mode: Optional[str] = None
    ) -> Tuple[np.ndarray, ...]:
        """Integer inputs -> integer outputs in a mode (default: the partition's mode)."""
        mode = mode or self.mode
        if mode == "disable" and self.program is not None:
            self._ran_in_the_clear = True
            outputs, wraps = self.program.run_checking_wraps(*q_inputs)
            self._warn_wraps(wraps)
            return as_tuple(outputs)
        self._require_compiled()
        if not self._wrap_warned and self.program is not None:  # a numpy run: little next to FHE
            self._warn_wraps(self.program.run_checking_wraps(*q_inputs)[1])
        if mode == "remote":
            return as_tuple(self.remote_runner(q_inputs))
        if mode == "execute":
            self.keygen()
        per_sample = self.runner.run(self._samples(q_inputs), mode)
        outputs = tuple(np.concatenate(parts) for parts in zip(*per_sample))
        if self.program is None:
            return outputs
        return tuple(d.decrypted(y) for d, y in zip(self.program.output_dequantizers, outputs))

    def _to_torch(self, outputs: Sequence[np.ndarray], like: Sequence[torch.Tensor]) -> Any:
        out_nodes = output_nodes(self.graph_module)
        device = like[0].device if like else None
        tensors = []
        for node, value in zip(out_nodes, outputs):
            meta = node.meta.get("val")
            dtype = meta.dtype if isinstance(meta, torch.Tensor) else torch.float32
            tensor = torch.from_numpy(np.asarray(value))
            tensor = tensor.round().to(dtype) if not dtype.is_floating_point else tensor.to(dtype)
            tensors.append(tensor.to(device))
        return tensors[0] if not _returns_tuple(self.graph_module) else tuple(tensors)

    # ---- sharing one circuit between dynamo's recompilations ---------------------------------

    def signature(self) -> Tuple[Any, ...]:
        """Structure of the partition: ops, per-sample shapes and constants (not the batch size).

        Dynamo recompiles a graph for a new batch size; partitions with equal signatures share
        one circuit and its keys (see `share`).
        """
        parts: List[Any] = []
        for node in self.graph_module.graph.nodes:
            value = node.meta.get("val")
            shape = (
                (str(value.dtype), tuple(_sample_dim(d) for d in value.shape[1:]))
                if isinstance(value, torch.Tensor)
                else None
            )
            if node.op == "get_attr":
                constant = fetch_attr(self.graph_module, node.target)
                parts.append(
                    (
                        "constant",
                        hashlib.sha256(constant.cpu().contiguous().numpy().tobytes()).hexdigest(),
                    )
                )
            elif node.op == "call_function" or (node.op == "placeholder" and shape is not None):
                # symbolic-size inputs left out: the program reads its shapes from calibration
                # (a graph specialised to batch 1 has no batch-size input, the dynamic one has)
                parts.append((node.op, str(node.target) if node.op == "call_function" else "", shape))
        return tuple(parts)

    def share(self, primary: "FhePartition") -> None:
        """Run through `primary`'s circuit, keys and mode (this graph is kept for torch mode)."""
        object.__setattr__(self, "primary", primary.primary or primary)

    # ---- inspection ---------------------------------------------------------------------

    @property
    def statistics(self) -> Dict[str, Any]:
        """Circuit cost figures: pbs_count, max_bit_width, max_tlu_bit_width, complexity, ..."""
        self._require_compiled()
        widths = self._lookup_widths()
        return {
            **self.runner.statistics,
            "max_tlu_bit_width": int(widths[0][0] if widths else 0),
            "input_shape": self._sample_shapes(),
        }

    def _sample_shapes(self) -> List[Tuple[int, ...]]:
        return [
            (rows, *self.stats[n.name].shape[1:])
            for n, rows in zip(self.program.tensor_inputs, self.rows_per_sample)
        ]

    def _require_compiled(self) -> None:
        if self.circuit is None:
            raise NotCompiledError(
                f"partition '{self.name}' is not compiled yet: call the model once (or give "
                "options={'inputset': ...})"
            )

    def _log(self, message: str) -> None:
        logger.info("%s: %s", self.name, message)
        if self.settings.verbose:
            print(f"[fhe_backend] {self.name}: {message}")

    def extra_repr(self) -> str:
        """Name, mode and module path, shown by print(model)."""
        return f"name={self.name!r}, mode={self._mode!r}, module={self.module_path!r}"


def _sample_dim(size: Any) -> str:
    """A per-sample dimension in a signature: a symbolic one by its traced value (the program's
    shapes come from calibration, whatever dynamo named the symbol in this graph)."""
    hint = getattr(getattr(size, "node", None), "hint", None)
    return str(hint if hint is not None else size)


def _returns_tuple(graph_module: fx.GraphModule) -> bool:
    output = next(n for n in graph_module.graph.nodes if n.op == "output")
    return isinstance(output.args[0], (tuple, list))
