"""Concrete-ML-compatible compile API: switch from Concrete ML by changing one import.

``from concrete.ml.torch.compile import compile_torch_model`` becomes
``from fhe_backend.compile import compile_torch_model``. The functions here are a thin layer over
the backend's own pipeline: the model is captured with ``torch.export`` (core ATen
decompositions), then goes through `fhe_backend.backend.compile_aten_graph` (the same graph
passes, partitioner, quantizer and lowerings as ``torch.compile(model, backend="fhe")``). As in
Concrete ML the whole model must run in FHE: an operator without an FHE lowering is an error
here (the ``torch.compile`` backend would run it in torch instead).

The result is a `QuantizedModule` wrapping the model's single `FhePartition`: float numpy arrays
in and out of ``forward(*x, fhe="disable"|"simulate"|"execute")``, the quantization steps
available separately, and the Concrete circuit as ``fhe_circuit``.
"""

from __future__ import annotations

import base64
import inspect
import io
import itertools
import json
import math
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from .backend import DECOMPOSITIONS, CompiledGraph, compile_aten_graph
from .errors import FheBackendError, LoweringError, NotCompiledError, OptionError, UnsupportedOpError
from .graph_utils import as_tuple, node_label
from .quantization.calibration import batches
from .quantization.quantizers import bit_width
from .runtime import FhePartition
from .settings import FheSettings, check_encryption_status

OPSET_VERSION_FOR_ONNX_EXPORT = 14
DEFAULT_QAT_IO_BITS = 8
QUANTIZED_MODULE_MODES = ("disable", "simulate", "execute")
EXPORT_EXAMPLE_BATCH = 2
SUPPORTED_DEVICES = ("cpu", "cuda")
ROUNDING_BITS_RANGE = (2, 8)  # Concrete ML's accepted rounding_threshold_bits
SERIALIZATION_FORMAT = "fhe_backend.QuantizedModule/1"

ArrayOrTensor = Union[torch.Tensor, np.ndarray]
InputSet = Union[ArrayOrTensor, Tuple[ArrayOrTensor, ...]]


# ---- small public helpers ---------------------------------------------------------------


def convert_torch_tensor_or_numpy_array_to_numpy_array(
    torch_tensor_or_numpy_array: ArrayOrTensor,
) -> np.ndarray:
    """A torch tensor (any device, with or without grad) or a numpy array, as a numpy array."""
    if isinstance(torch_tensor_or_numpy_array, torch.Tensor):
        return torch_tensor_or_numpy_array.detach().cpu().numpy()
    if isinstance(torch_tensor_or_numpy_array, np.ndarray):
        return torch_tensor_or_numpy_array
    raise OptionError(
        f"expected a torch.Tensor or a numpy.ndarray, got {type(torch_tensor_or_numpy_array).__name__}"
    )


def has_any_qnn_layers(torch_model: torch.nn.Module) -> bool:
    """True when the model contains quantized (QAT) layers: Brevitas QNN layers or fake-quantizers."""
    from .qat import has_any_qnn_layers as qat_has_any_qnn_layers

    return qat_has_any_qnn_layers(torch_model)


# ---- the compiled model -----------------------------------------------------------------


class QuantizedModule:
    """A model quantized into one FHE integer program, and (once compiled) its Concrete circuit.

    Inputs and outputs follow the original model's order; internally the partition may order
    them differently, which `input_order` / `output_order` record.
    """

    def __init__(self, graph: Optional[CompiledGraph] = None, aten_code: str = ""):
        self.aten_code = aten_code
        self.source: Optional[Dict[str, Any]] = None  # what `dump` saves (set by _build)
        self.graph: Optional[CompiledGraph] = graph
        self.partition: Optional[FhePartition] = None
        if graph is None:  # empty, as Concrete ML's QuantizedModule(): nothing runs, nothing compiles
            self.input_order, self.output_order = [], []
            return
        if len(graph.partitions) != 1:
            raise UnsupportedOpError(
                f"the model was captured as {len(graph.partitions)} FHE parts instead of one; "
                "compile it with torch.compile(model, backend='fhe') to run several parts"
            )
        self.partition = graph.partitions[0]
        self.input_order = _partition_input_order(graph, self.partition)
        self.output_order = _partition_output_order(graph, self.partition)

    # -- quantizers --------------------------------------------------------------------------

    @property
    def program(self):
        """The `IntegerProgram` run in every mode."""
        return self._require_model().program

    def _require_model(self) -> FhePartition:
        """The partition; an empty module (`QuantizedModule()`) raises."""
        if self.partition is None:
            raise ModuleNotCompiledError(
                "The quantized module is not compiled: this QuantizedModule is empty (built "
                "without a model); make one with compile_torch_model, compile_brevitas_qat_model "
                "or build_quantized_module"
            )
        return self.partition

    @property
    def input_quantizers(self) -> List[Any]:
        """One `UniformQuantizer` per model input, in the model's input order."""
        by_user = dict(zip(self.input_order, self.program.input_quantizers))
        return [by_user[index] for index in range(len(self.input_order))]

    @property
    def output_dequantizers(self) -> List[Any]:
        """One `OutputDequantizer` per model output, in the model's output order."""
        return [self.program.output_dequantizers[index] for index in self.output_order]

    output_quantizers = output_dequantizers  # Concrete ML's name

    @property
    def inputs_encryption_status(self) -> Tuple[str, ...]:
        """'encrypted' or 'clear' per model input."""
        by_user = dict(zip(self.input_order, self.partition.encryption_status))
        return tuple(by_user[index] for index in range(len(self.input_order)))

    # -- circuit -----------------------------------------------------------------------------

    @property
    def is_compiled(self) -> bool:
        """True once `compile` has produced a circuit."""
        return self.partition is not None and self.partition.compiled

    def check_model_is_compiled(self) -> None:
        """Raise `ModuleNotCompiledError` (a `NotCompiledError` and, as in Concrete ML, an
        `AttributeError`) unless the circuit exists."""
        self._require_model()
        if not self.is_compiled:
            raise ModuleNotCompiledError(
                "The quantized module is not compiled: it is quantized, call "
                "quantized_module.compile(inputset) (or use compile_torch_model) before using the "
                "FHE circuit or the 'simulate' / 'execute' modes"
            )

    @property
    def fhe_circuit(self):
        """The Concrete `fhe.Circuit` (raises `NotCompiledError` before `compile`)."""
        self.check_model_is_compiled()
        return self.partition.circuit

    @property
    def statistics(self) -> Dict[str, Any]:
        """Circuit cost figures: pbs_count, max_bit_width, complexity, ..."""
        self.check_model_is_compiled()
        return self.partition.statistics

    def compile(
        self,
        inputs: InputSet,
        configuration: Any = None,
        artifacts: Any = None,
        show_mlir: bool = False,
        p_error: Optional[float] = None,
        global_p_error: Optional[float] = None,
        verbose: bool = False,
        inputs_encryption_status: Optional[Sequence[str]] = None,
        device: str = "cpu",
    ):
        """Compile the integer program into a Concrete circuit on a float inputset; returns it.

        `device` is where the circuit runs: "cpu", or "cuda" with a GPU build of concrete-python.
        """
        configuration = _device_configuration(configuration, device)
        settings = self.partition.settings.replace(
            configuration=_configuration(configuration, verbose),
            show_mlir=show_mlir,
            p_error=p_error,
            global_p_error=global_p_error,
            verbose=verbose,
        )
        if inputs_encryption_status is not None:
            self._set_encryption_status(
                settings.replace(inputs_encryption_status=inputs_encryption_status).inputs_encryption_status
            )
        _check_artifacts(artifacts)
        self.partition.settings = settings
        columns = [torch.cat(column) for column in zip(*batches(inputs))]
        q_inputs = self._partition_inputs(as_tuple(self.quantize_input(*columns)))
        try:
            self.partition.compile_circuit(q_inputs, artifacts=artifacts)
        except (ValueError, AssertionError) as error:
            rounding = settings.rounding_threshold_bits
            if rounding is None or isinstance(error, FheBackendError):
                raise
            raise LoweringError(
                f"Concrete failed to compile the circuit with rounding_threshold_bits = "
                f"{{'n_bits': {rounding.n_bits!r}, 'method': '{rounding.method}'}} "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'assertion'}), "
                "a failure of Concrete's rounding at these widths: use method 'exact', another "
                "n_bits (e.g. 6) or 'auto', or no rounding"
            ) from error
        if artifacts is not None:
            self._fill_artifacts(artifacts)
        return self.partition.circuit

    def _set_encryption_status(self, status: Tuple[str, ...]) -> None:
        check_encryption_status(status, len(self.input_order))
        ordered = tuple(status[index] for index in self.input_order)
        self.partition.encryption_status = ordered
        self.program.encryption_status = ordered

    # -- running -----------------------------------------------------------------------------

    def quantize_input(self, *x: ArrayOrTensor):
        """Float inputs (model order) -> integer inputs: one array, or a tuple for several."""
        self._check_count(x, len(self.input_order), "input")
        arrays = [convert_torch_tensor_or_numpy_array_to_numpy_array(_as_array(v)) for v in x]
        quantized = [quantizer.quantize(array) for quantizer, array in zip(self.input_quantizers, arrays)]
        return _single_or_tuple(quantized)

    def quantized_forward(self, *q_x: np.ndarray, fhe: Any = "disable"):
        """Integer inputs -> integer outputs, in the clear, in simulation or encrypted."""
        self._check_count(q_x, len(self.input_order), "quantized input")
        for index, value in enumerate(q_x):
            dtype = np.asarray(value).dtype
            if not np.issubdtype(dtype, np.integer):
                raise TypeError(
                    f"Input values are expected to be integers of dtype int64 (the output of "
                    f"quantize_input), got {dtype} for input {index}: quantize floats with "
                    "quantize_input first, or call forward"
                )
        mode = _mode(fhe)
        if mode != "disable":
            self.check_model_is_compiled()
        q_outputs = self.partition.run_integers(self._partition_inputs(q_x), mode)
        return _single_or_tuple([np.asarray(q_outputs[index]) for index in self.output_order])

    def dequantize_output(self, *q_y: np.ndarray):
        """Integer outputs -> float outputs (numpy)."""
        self._check_count(q_y, len(self.output_order), "quantized output")
        floats = [d.dequantize(q) for d, q in zip(self.output_dequantizers, q_y)]
        return _single_or_tuple(floats)

    def forward(self, *x: ArrayOrTensor, fhe: Any = "disable", debug: bool = False):
        """Float inputs -> float outputs: quantize, run in the `fhe` mode, dequantize.

        debug=True (mode "disable" only, as in Concrete ML) returns ``(outputs, values)`` where
        `values` maps each operation of the integer program ('module path/node') to
        ``{"output": its float value}`` (what its integers decode to), for comparing
        intermediate values with torch.
        """
        self._check_float_inputs(x)
        q_x = as_tuple(self.quantize_input(*x))
        if debug and _mode(fhe) == "disable":
            values: Dict[str, Dict[Any, np.ndarray]] = {}
            with _recording_values(self, values):
                q_y = as_tuple(self.quantized_forward(*q_x, fhe="disable"))
            return self.post_processing(self.dequantize_output(*q_y)), values
        q_y = as_tuple(self.quantized_forward(*q_x, fhe=fhe))
        return self.post_processing(self.dequantize_output(*q_y))

    __call__ = forward

    def _check_float_inputs(self, x: Sequence[Any]) -> None:
        """Integer values for an input calibrated on floats are refused, as in Concrete ML (an
        input calibrated on integers, such as token ids, takes integers)."""
        self._check_count(x, len(self.input_order), "input")
        program = self.program
        by_user = dict(zip(self.input_order, program.tensor_inputs))
        for index, value in enumerate(x):
            dtype = value.dtype if isinstance(value, (torch.Tensor, np.ndarray)) else None
            is_float = dtype is None or (
                dtype.is_floating_point
                if isinstance(dtype, torch.dtype)
                else np.issubdtype(dtype, np.floating)
            )
            if not is_float and not program.stats[by_user[index].name].integral:
                raise TypeError(
                    f"Input values are expected to be floating points of dtype float32 or "
                    f"float64 (the model was calibrated on floats), got {dtype} for input {index}: "
                    "cast them (x.astype(numpy.float64)), or pass integers to quantized_forward"
                )

    def post_processing(self, values: Any) -> Any:
        """Hook applied to the dequantized outputs (identity, as in Concrete ML)."""
        return values

    def _partition_inputs(self, q_x: Sequence[np.ndarray]) -> List[np.ndarray]:
        return [np.asarray(q_x[index]) for index in self.input_order]

    def _check_count(self, values: Sequence[Any], expected: int, what: str) -> None:
        self._require_model()
        if len(values) != expected:
            raise OptionError(f"got {len(values)} {what}(s), the model has {expected}")

    # -- reports -----------------------------------------------------------------------------

    def bitwidth_and_range_report(self) -> Optional[Dict[str, Dict[str, Any]]]:
        """Per table lookup: {name: {"range": (low, high), "bitwidth": bits, ...}}; None until
        the module is compiled (as in Concrete ML; `lookup_report` works before).

        The range is the integer range of the lookup's input over the calibration set, named
        after the node that computed it (the ReLU after fc1 reads fc1's accumulator:
        'fc1/addmm'); "bitwidth" is the precision the lookup runs at (after rounding),
        "accumulator_bitwidth" the precision before rounding. Names are 'module path/node' of
        the ATen graph.
        """
        return self.lookup_report() if self.is_compiled else None

    def lookup_report(self) -> Dict[str, Dict[str, Any]]:
        """`bitwidth_and_range_report` computed from the calibration, compiled or not."""
        nodes = {node.name: node for node in self.partition.graph_module.graph.nodes}
        report: Dict[str, Dict[str, Any]] = {}
        for key, (low, high) in self.partition.lookup_ranges.items():
            node_name = self.program.lookup_sources.get(key, key.split(":")[0])
            node = nodes.get(node_name)
            name = base = node_label(node) if node is not None else node_name
            for index in itertools.count(1):  # several lookups read one node's integers
                if name not in report:
                    break
                name = f"{base}:{index}"
            bits = bit_width(low, high)
            report[name] = {
                "range": (int(low), int(high)),
                "bitwidth": bits - self.program.rounding_lsbs.get(key, 0),
                "accumulator_bitwidth": bits,
                "op": str(getattr(node, "target", "")),
            }
        return report

    def describe_program(self) -> str:
        """A readable description of the quantized program (quantizers, lookups, outputs)."""
        lines = ["inputs:"]
        for index, (quantizer, status) in enumerate(
            zip(self.input_quantizers, self.inputs_encryption_status)
        ):
            lines.append(f"  input {index} ({status}): {quantizer}")
        lines.append("table lookups:")
        for name, entry in self.lookup_report().items():
            lines.append(f"  {name}: {entry}")
        lines.append("outputs:")
        for index, dequantizer in enumerate(self.output_dequantizers):
            lines.append(f"  output {index}: {dequantizer}")
        return "\n".join(lines)

    def _fill_artifacts(self, artifacts: Any) -> None:
        from concrete.fhe.compilation.artifacts import FunctionDebugArtifacts

        entry = artifacts.module_artifacts.functions.setdefault("torch_model", FunctionDebugArtifacts())
        entry.add_source_code(self.aten_code)
        entry.textual_representations_of_graphs["aten"] = [str(self.partition.graph_module.graph)]
        entry.textual_representations_of_graphs["quantized_program"] = [self.describe_program()]

    # -- serialization (Concrete ML's dump/dumps/load/loads) ---------------------------------

    def dump_dict(self) -> Dict[str, Any]:
        """The module as a JSON-compatible dict: the model and inputset it was built from, and
        its quantization options (no circuit, no key). Loading rebuilds the same quantized
        program (calibration is deterministic): it runs ``fhe="disable"`` with identical
        results; call ``compile(inputset)`` on it for the other modes."""
        if self.source is None:
            raise OptionError(
                "this QuantizedModule was not built by fhe_backend.compile "
                "(build_quantized_module / compile_*_model): nothing to dump"
            )
        buffer = io.BytesIO()
        torch.save(self.source, buffer)
        return {
            "format": SERIALIZATION_FORMAT,
            "was_compiled": self.is_compiled,
            "source": base64.b64encode(buffer.getvalue()).decode("ascii"),
        }

    @staticmethod
    def load_dict(metadata: Dict[str, Any]) -> "QuantizedModule":
        """Inverse of `dump_dict` (the data must come from a trusted source: it holds pickles)."""
        if not isinstance(metadata, dict) or metadata.get("format") != SERIALIZATION_FORMAT:
            raise OptionError(
                f"not a serialized QuantizedModule (expected format "
                f"{SERIALIZATION_FORMAT!r}); write it with QuantizedModule.dump(s)"
            )
        source = torch.load(io.BytesIO(base64.b64decode(metadata["source"])), weights_only=False)
        settings = _settings(
            n_bits=source["n_bits"],
            rounding_threshold_bits=source["rounding_threshold_bits"],
            precision_search=source.get("precision_search"),  # searched again: same choice
        )
        return _build(
            source["model"], source["inputset"], settings, source["reduce_sum_copy"], source["import_qat"]
        )

    def dumps(self) -> str:
        """The module as a JSON string (see `dump_dict`)."""
        return json.dumps(self.dump_dict())

    def dump(self, file: Any) -> None:
        """Write `dumps()` to an open text file."""
        file.write(self.dumps())

    @staticmethod
    def loads(text: str) -> "QuantizedModule":
        """A module from `dumps()`'s string."""
        return QuantizedModule.load_dict(json.loads(text))

    @staticmethod
    def load(file: Any) -> "QuantizedModule":
        """A module from a text file written by `dump`."""
        return QuantizedModule.loads(file.read())

    def __repr__(self) -> str:
        state = "compiled" if self.is_compiled else "quantized, not compiled"
        return (
            f"QuantizedModule({len(self.input_order)} input(s), {len(self.output_order)} output(s), {state})"
        )


# ---- the compile functions --------------------------------------------------------------


def build_quantized_module(
    model: Any,
    torch_inputset: InputSet,
    import_qat: bool = False,
    n_bits: Union[int, Dict[str, int]] = 8,
    rounding_threshold_bits: Union[None, int, Dict[str, Any]] = None,
    reduce_sum_copy: bool = False,
    keep_onnx: Optional[bool] = True,
    device: str = "cpu",
) -> QuantizedModule:
    """Capture and quantize a torch or ONNX model on the inputset, without compiling a circuit.

    The result runs with ``fhe="disable"``; call ``.compile(inputset)`` for the other modes.
    `import_qat=True` requires quantizers in the model (Brevitas layers or round/clamp
    fake-quantizers); `reduce_sum_copy` and `keep_onnx` have no effect (sums are leveled
    operations here, and no ONNX graph is made); `device` is checked as in Concrete ML.
    """
    _check_device(device)
    _check_rounding(rounding_threshold_bits)
    settings = _settings(n_bits=n_bits, rounding_threshold_bits=rounding_threshold_bits)
    return _build(model, torch_inputset, settings, reduce_sum_copy, import_qat)


def compile_torch_model(
    torch_model: torch.nn.Module,
    torch_inputset: InputSet,
    import_qat: bool = False,
    configuration: Any = None,
    artifacts: Any = None,
    show_mlir: bool = False,
    n_bits: Union[int, Dict[str, int]] = 8,
    rounding_threshold_bits: Union[None, int, Dict[str, Any]] = None,
    p_error: Optional[float] = None,
    global_p_error: Optional[float] = None,
    verbose: bool = False,
    inputs_encryption_status: Optional[Sequence[str]] = None,
    reduce_sum_copy: bool = False,
    device: str = "cpu",
    precision_search: Any = None,
    runner: str = "auto",
) -> QuantizedModule:
    """Quantize a torch model on the inputset and compile it into one FHE circuit.

    Parameters mean what they mean in Concrete ML (see docs/concrete-ml.md); every operator of
    the model must have an FHE lowering. `precision_search` (not in Concrete ML) searches the
    lowest bit-widths within a task-metric tolerance (`fhe_backend.settings.PrecisionSearch`);
    `runner` (not in Concrete ML) is how `fhe="execute"` runs a batch's samples: "auto"
    ("processes" on several cores), "processes", "threads", "local", or "ray" (see docs/ray.md).
    """
    if not isinstance(torch_model, torch.nn.Module):
        raise OptionError(
            f"compile_torch_model expects a torch.nn.Module, got "
            f"{type(torch_model).__name__}; use compile_onnx_model for ONNX models"
        )
    if not import_qat and _has_brevitas_layers(torch_model):
        raise ModelTypeError(
            f"{type(torch_model).__name__} contains Brevitas quantized layers: it must be imported "
            "using compile_brevitas_qat_model(model, inputset), or pass import_qat=True to "
            "compile_torch_model"
        )
    return _compile(
        torch_model,
        torch_inputset,
        configuration=configuration,
        artifacts=artifacts,
        show_mlir=show_mlir,
        n_bits=n_bits,
        rounding_threshold_bits=rounding_threshold_bits,
        p_error=p_error,
        global_p_error=global_p_error,
        verbose=verbose,
        inputs_encryption_status=inputs_encryption_status,
        reduce_sum_copy=reduce_sum_copy,
        device=device,
        precision_search=precision_search,
        runner=runner,
        import_qat=import_qat,
    )


def compile_onnx_model(
    onnx_model: Any,
    torch_inputset: InputSet,
    import_qat: bool = False,
    configuration: Any = None,
    artifacts: Any = None,
    show_mlir: bool = False,
    n_bits: Union[int, Dict[str, int]] = 8,
    rounding_threshold_bits: Union[None, int, Dict[str, Any]] = None,
    p_error: Optional[float] = None,
    global_p_error: Optional[float] = None,
    verbose: bool = False,
    inputs_encryption_status: Optional[Sequence[str]] = None,
    reduce_sum_copy: bool = False,
    device: str = "cpu",
) -> QuantizedModule:
    """Compile an `onnx.ModelProto`: it is converted to torch (`OnnxModule`) and compiled as such.

    QAT graphs (their round/clip fake-quantizers) are detected by the backend's graph passes;
    with `import_qat=True` they must be found.
    """
    return _compile(
        OnnxModule(onnx_model),
        torch_inputset,
        configuration=configuration,
        artifacts=artifacts,
        show_mlir=show_mlir,
        n_bits=n_bits,
        rounding_threshold_bits=rounding_threshold_bits,
        p_error=p_error,
        global_p_error=global_p_error,
        verbose=verbose,
        inputs_encryption_status=inputs_encryption_status,
        reduce_sum_copy=reduce_sum_copy,
        device=device,
        import_qat=import_qat,
    )


def compile_brevitas_qat_model(
    torch_model: torch.nn.Module,
    torch_inputset: InputSet,
    n_bits: Union[None, int, Dict[str, int]] = None,
    configuration: Any = None,
    artifacts: Any = None,
    show_mlir: bool = False,
    rounding_threshold_bits: Union[None, int, Dict[str, Any]] = None,
    p_error: Optional[float] = None,
    global_p_error: Optional[float] = None,
    output_onnx_file: Union[None, Path, str] = None,
    verbose: bool = False,
    inputs_encryption_status: Optional[Sequence[str]] = None,
    reduce_sum_copy: bool = False,
    device: str = "cpu",
    precision_search: Any = None,
    runner: str = "auto",
) -> QuantizedModule:
    """Compile a trained Brevitas QAT model with its own scales, zero-points and bit-widths.

    `n_bits` only sets the quantizers Brevitas does not define (model inputs/outputs, default
    8 bits): None, an int, or a dict with 'model_inputs' / 'model_outputs'.
    `output_onnx_file`, when given, receives a QONNX export of the model (Brevitas' exporter).
    `precision_search` (not in Concrete ML) searches the lowest lookup precision within a
    task-metric tolerance (`fhe_backend.settings.PrecisionSearch`; Brevitas fixes the other bits).
    `runner` (not in Concrete ML): how `fhe="execute"` runs a batch's samples, as in
    `compile_torch_model`.
    """
    if not isinstance(torch_model, torch.nn.Module) or not _has_brevitas_layers(torch_model):
        raise ModelTypeError(
            f"compile_brevitas_qat_model was given {type(torch_model).__name__}, which has no "
            "Brevitas quantized layers, consider using compile_torch_model instead "
            "(compile_torch_model(model, inputset, n_bits=...) quantizes a float model; Brevitas "
            "layers are brevitas.nn.QuantLinear, QuantIdentity, ...)"
        )
    if output_onnx_file is not None:
        _export_qonnx(torch_model, torch_inputset, Path(output_onnx_file))
    return _compile(
        torch_model,
        torch_inputset,
        configuration=configuration,
        artifacts=artifacts,
        show_mlir=show_mlir,
        n_bits=_qat_n_bits(n_bits),
        rounding_threshold_bits=rounding_threshold_bits,
        p_error=p_error,
        global_p_error=global_p_error,
        verbose=verbose,
        inputs_encryption_status=inputs_encryption_status,
        reduce_sum_copy=reduce_sum_copy,
        device=device,
        precision_search=precision_search,
        runner=runner,
        import_qat=False,
    )


def _compile(
    model: torch.nn.Module,
    inputset: InputSet,
    *,
    configuration: Any,
    artifacts: Any,
    show_mlir: bool,
    n_bits: Any,
    rounding_threshold_bits: Any,
    p_error: Any,
    global_p_error: Any,
    verbose: bool,
    inputs_encryption_status: Any,
    reduce_sum_copy: bool,
    device: str,
    import_qat: bool,
    precision_search: Any = None,
    runner: str = "auto",
) -> QuantizedModule:
    """Build the quantized module, then compile its circuit with the compilation options."""
    _check_artifacts(artifacts)
    _check_device(device)
    _check_rounding(rounding_threshold_bits)
    _warn_mono_parameters(configuration, rounding_threshold_bits)
    settings = _settings(
        n_bits=n_bits,
        rounding_threshold_bits=rounding_threshold_bits,
        p_error=p_error,
        global_p_error=global_p_error,
        inputs_encryption_status=inputs_encryption_status,
        verbose=verbose,
        precision_search=precision_search,
        runner=runner,
    )
    quantized = _build(model, inputset, settings, reduce_sum_copy, import_qat)
    quantized.compile(
        inputset,
        configuration=configuration,
        artifacts=artifacts,
        show_mlir=show_mlir,
        p_error=p_error,
        global_p_error=global_p_error,
        verbose=verbose,
        device=device,
    )
    if verbose:
        print(f"[fhe_backend] compiled: {quantized.statistics}")
    return quantized


def _warn_mono_parameters(configuration: Any, rounding_threshold_bits: Any) -> None:
    """Rounding pays off with Concrete's multi-parameter optimization (as Concrete ML warns)."""
    from concrete.fhe import ParameterSelectionStrategy

    strategy = getattr(configuration, "parameter_selection_strategy", ParameterSelectionStrategy.MULTI)
    if rounding_threshold_bits is not None and strategy != ParameterSelectionStrategy.MULTI:
        warnings.warn(
            f"fhe_backend: the configuration's parameter_selection_strategy is {strategy}: it is "
            "recommended to set the optimization strategy to multi-parameter when using "
            "rounding as it should provide better performance "
            "(fhe.ParameterSelectionStrategy.MULTI, Concrete's default)",
            stacklevel=4,
        )


def _build(
    model: Any, inputset: InputSet, settings: FheSettings, reduce_sum_copy: bool, import_qat: bool = False
) -> QuantizedModule:
    """Capture (torch.export), run the backend pipeline, calibrate and quantize; no circuit."""
    if not isinstance(reduce_sum_copy, bool):
        raise OptionError(f"reduce_sum_copy = {reduce_sum_copy!r}: expected a bool")
    if not isinstance(model, torch.nn.Module):
        model = OnnxModule(model)
    original = _snapshot(model)
    if _has_brevitas_layers(model):
        from .qat import prepare_qat_model

        model = prepare_qat_model(model)
    exported = _export(model, inputset)
    graph_module = exported.graph_module
    aten_code = graph_module.code
    values, constant_flags = _lifted_inputs(exported)
    with warnings.catch_warnings():
        # unsupported ops are collected from `left_in_torch` and raised together below
        warnings.filterwarnings("ignore", message="fhe_backend: running in torch")
        graph = compile_aten_graph(graph_module, values, constant_flags, settings)
    if graph.left_in_torch:
        listed = "\n  ".join(str(node) for node in graph.left_in_torch)
        raise UnsupportedOpError(
            f"{type(model).__name__} cannot run entirely in FHE; these operators have no FHE "
            f"lowering:\n  {listed}\nRewrite them with supported operators, or compile the model "
            "with torch.compile(model, backend='fhe') to run them in torch around the FHE parts"
        )
    if not graph.partitions:
        raise UnsupportedOpError(
            f"{type(model).__name__} has no operator that depends on its "
            "inputs: there is nothing to run in FHE"
        )
    quantized = QuantizedModule(graph, aten_code)
    if import_qat and _has_weight_layers(quantized) and not _has_quantizers(quantized):
        raise OptionError(
            "Error occurred during quantization aware training (QAT) import: import_qat=True but "
            f"{type(model).__name__} has weight layers and no quantizer (no Brevitas layer, no round/clamp "
            "fake-quantizer reached the graph), so its values cannot be read as quantized. Add "
            "a quantizer before each linear layer (e.g. brevitas.nn.QuantIdentity), or compile "
            "it post-training with import_qat=False and n_bits=..."
        )
    graph.calibrate(inputset, compile_circuits=False)
    quantized.source = _source(original, inputset, settings, reduce_sum_copy, import_qat)
    if settings.verbose:
        print(
            f"[fhe_backend] quantized {type(model).__name__}: "
            f"{len(quantized.lookup_report())} table lookup(s)"
        )
    return quantized


# ---- capture ----------------------------------------------------------------------------


def _export(model: torch.nn.Module, inputset: InputSet):
    """torch.export the model in eval mode (batch dim dynamic when possible), to core ATen."""
    example = tuple(t[:EXPORT_EXAMPLE_BATCH] for t in batches(inputset)[0])
    dynamic: Tuple[Any, ...] = tuple({0: torch.export.Dim.AUTO} if t.dim() else None for t in example)
    parameters = list(inspect.signature(model.forward).parameters.values())
    if parameters and parameters[0].kind == inspect.Parameter.VAR_POSITIONAL:
        dynamic = (dynamic,)  # forward(*inputs): one entry holding every input
    was_training = model.training
    model.eval()
    try:
        # Brevitas layers read their quantizers through dynamo (strict); others trace non-strict
        strict = _has_brevitas_layers(model)
        try:
            exported = torch.export.export(model, example, dynamic_shapes=dynamic, strict=strict)
        except Exception:  # noqa: BLE001 - the other tracer may handle this model
            exported = torch.export.export(model, example, dynamic_shapes=dynamic, strict=not strict)
        return exported.run_decompositions(DECOMPOSITIONS)
    except FheBackendError:
        raise
    except Exception as error:
        raise FheBackendError(
            f"torch.export could not capture {type(model).__name__} as one graph "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). The "
            "Concrete-ML-style API needs a single graph; torch.compile(model, backend='fhe') "
            "accepts graph breaks and runs the untraceable parts in torch"
        ) from error
    finally:
        model.train(was_training)


def _lifted_inputs(exported) -> Tuple[List[Any], List[bool]]:
    """Values and constant flags of the exported graph's placeholders (weights are constants)."""
    from torch.export.graph_signature import InputKind

    values: List[Any] = []
    constant_flags: List[bool] = []
    for spec in exported.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            values.append(None)
            constant_flags.append(False)
            continue
        source = exported.state_dict if spec.target in exported.state_dict else exported.constants
        value = source[spec.target]
        values.append(value.detach() if isinstance(value, torch.Tensor) else value)
        constant_flags.append(True)
    return values, constant_flags


def _partition_input_order(graph: CompiledGraph, partition: FhePartition) -> List[int]:
    """For each tensor input of the partition, the index of the model input it is."""
    call = _partition_call(graph, partition)
    user = [
        n.name
        for n in graph.split.graph.nodes
        if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
    ]
    order = []
    for arg in call.args:
        if not (isinstance(arg, fx.Node) and isinstance(arg.meta.get("val"), torch.Tensor)):
            continue
        if arg.name not in user:
            raise UnsupportedOpError(
                f"the FHE circuit reads '{arg.name}', which is not a model "
                "input: the whole model must run in FHE"
            )
        order.append(user.index(arg.name))
    unused = sorted(set(range(len(user))) - set(order))
    if unused:
        raise OptionError(
            f"model input(s) {[user[i] for i in unused]} are not used by any "
            "computation; remove them from the model's signature"
        )
    return order


def _partition_output_order(graph: CompiledGraph, partition: FhePartition) -> List[int]:
    """For each model output, the index of the partition output that produces it."""
    call = _partition_call(graph, partition)
    output = next(n for n in graph.split.graph.nodes if n.op == "output")
    order = []
    for value in _flat(output.args[0]):
        if value is call:
            order.append(0)
        elif (
            isinstance(value, fx.Node)
            and value.op == "call_function"
            and value.args
            and value.args[0] is call
        ):
            order.append(int(value.args[1]))
        else:
            raise UnsupportedOpError(
                f"model output '{value}' is not computed in FHE (a constant "
                "or an input returned as is); return only computed values"
            )
    return order


def _partition_call(graph: CompiledGraph, partition: FhePartition) -> fx.Node:
    return next(n for n in graph.split.graph.nodes if n.op == "call_module" and n.target == partition.name)


def _flat(value: Any) -> List[Any]:
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _flat(item)]
    return [value]


# ---- options ----------------------------------------------------------------------------


def _settings(**options: Any) -> FheSettings:
    """Backend settings for the compile API (validated like the torch.compile options)."""
    options = {key: value for key, value in options.items() if value is not None}
    return FheSettings.from_options({**options, "fhe": "disable"})


def _qat_n_bits(n_bits: Union[None, int, Dict[str, int]]) -> Dict[str, int]:
    """Concrete ML's QAT n_bits (None, int, or model_inputs/model_outputs) as a full dict."""
    full = dict(
        op_inputs=DEFAULT_QAT_IO_BITS,
        op_weights=DEFAULT_QAT_IO_BITS,
        model_inputs=DEFAULT_QAT_IO_BITS,
        model_outputs=DEFAULT_QAT_IO_BITS,
    )
    if n_bits is None:
        return full
    if isinstance(n_bits, dict):
        unknown = set(n_bits) - {"model_inputs", "model_outputs", "op_inputs", "op_weights"}
        if unknown:
            raise ModelTypeError(
                f"n_bits = {n_bits!r}: for a Brevitas model n_bits should only contain the "
                "following keys: 'model_inputs', 'model_outputs' (Brevitas sets the others); "
                f"unknown: {sorted(unknown)}"
            )
        return {**full, **n_bits}
    if isinstance(n_bits, int) and not isinstance(n_bits, bool):
        # as in Concrete ML, an int sets only what Brevitas leaves open: the model's inputs/outputs
        return {**full, "model_inputs": n_bits, "model_outputs": n_bits}
    raise OptionError(
        f"n_bits = {n_bits!r}: for a Brevitas model expected None, an int, or a dict "
        "with 'model_inputs' / 'model_outputs'"
    )


def _configuration(configuration: Any, verbose: bool) -> Any:
    """The user's Configuration, with Concrete's verbose output switched on when asked."""
    if not verbose:
        return configuration
    from concrete import fhe

    return (configuration or fhe.Configuration()).fork(verbose=True)


def _check_artifacts(artifacts: Any) -> None:
    if artifacts is None:
        return
    from concrete import fhe

    if not isinstance(artifacts, fhe.DebugArtifacts):
        raise OptionError(
            f"artifacts = {artifacts!r}: expected a concrete.fhe.DebugArtifacts "
            "(fhe.DebugArtifacts(output_directory)), then artifacts.export()"
        )


def _mode(fhe: Any) -> str:
    mode = getattr(fhe, "value", fhe)
    if mode not in QUANTIZED_MODULE_MODES:
        raise OptionError(f"fhe = {fhe!r}: allowed modes are {QUANTIZED_MODULE_MODES}")
    return mode


def _snapshot(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model as compiled (later training must not change what `dump` saves)."""
    import copy

    try:
        return copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - a model that cannot be copied is saved as it is at dump time
        return model


def _source(
    model: torch.nn.Module, inputset: InputSet, settings: FheSettings, reduce_sum_copy: bool, import_qat: bool
) -> Dict[str, Any]:
    """What rebuilds a QuantizedModule: model, inputset (as tensors) and quantization options."""
    columns = [torch.cat(column) for column in zip(*batches(inputset))]
    return {
        "model": model,
        "inputset": tuple(columns) if len(columns) > 1 else columns[0],
        "n_bits": settings.n_bits,
        "rounding_threshold_bits": settings.rounding_threshold_bits,
        "precision_search": settings.precision_search,
        "reduce_sum_copy": reduce_sum_copy,
        "import_qat": import_qat,
    }


def _has_weight_layers(quantized: QuantizedModule) -> bool:
    """True when the captured graph multiplies by weights (matmuls, convolutions): what QAT
    import reads as quantized (a model without any has nothing to import, as in Concrete ML)."""
    aten = torch.ops.aten
    weight_ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.convolution.default}
    return any(node.target in weight_ops for node in quantized.partition.graph_module.graph.nodes)


def _has_quantizers(quantized: QuantizedModule) -> bool:
    """True when the captured graph holds QAT fake-quantizers (Brevitas' or detected ones)."""
    from .lowering.quant import FAKE_QUANT

    return any(node.target == FAKE_QUANT for node in quantized.partition.graph_module.graph.nodes)


def _check_device(device: Any) -> bool:
    """Concrete ML's `device` check: 'cpu' or 'cuda'; True when the circuit targets a GPU."""
    if device not in SUPPORTED_DEVICES:
        raise OptionError(
            f"device = {device!r}: model compilation targets given through the "
            f"`device` argument can be one of {list(SUPPORTED_DEVICES)}"
        )
    if device == "cpu":
        return False
    from concrete.compiler import check_gpu_available, check_gpu_enabled

    if not (check_gpu_enabled() and check_gpu_available()):
        raise OptionError(
            "device = 'cuda': the installed concrete-python has no CUDA support or "
            "no GPU is visible; install the GPU build of concrete-python (from "
            "Zama's GPU package index) on a machine with an NVIDIA GPU, or use "
            "device='cpu'"
        )
    return True


def _device_configuration(configuration: Any, device: str) -> Any:
    """The user's Configuration, with Concrete's GPU backend switched on for device='cuda'."""
    if not _check_device(device):
        return configuration
    from concrete import fhe

    return (configuration or fhe.Configuration()).fork(use_gpu=True)


def _check_rounding(rounding_threshold_bits: Any) -> None:
    """Concrete ML's validation of `rounding_threshold_bits` (its error types and ranges), with
    ``"auto"`` (or ``{"n_bits": "auto"}``) accepted as this project's addition."""
    value = rounding_threshold_bits
    if value is None or value == "auto":
        return
    if isinstance(value, dict):
        unknown = set(value) - {"n_bits", "method"}
        if unknown:
            raise RoundingKeyError(
                f"rounding_threshold_bits = {value!r}: Invalid keys in rounding_threshold_bits. "
                "Allowed keys are ['method', 'n_bits']."
            )
        method = value.get("method", "EXACT")
        name = str(getattr(method, "name", method)).upper()
        if name not in ("EXACT", "APPROXIMATE"):
            raise OptionError(
                f"rounding_threshold_bits method: {name} is not a valid method. "
                "Must be one of EXACT, APPROXIMATE."
            )
        n_bits = value.get("n_bits")
        if n_bits == "auto":
            return
        if isinstance(n_bits, bool) or not isinstance(n_bits, int):
            raise OptionError(f"rounding_threshold_bits = {value!r}: n_bits must be an integer (or 'auto').")
    elif isinstance(value, int) and not isinstance(value, bool):
        n_bits = value
    else:
        raise OptionError(
            f"rounding_threshold_bits = {value!r}: Invalid type for "
            "rounding_threshold_bits. Must be int or dict (or 'auto')."
        )
    low, high = ROUNDING_BITS_RANGE
    if not low <= n_bits <= high:
        raise OptionError(
            f"rounding_threshold_bits n_bits = {n_bits}: n_bits_rounding must be "
            f"between {low} and {high} inclusive (lookups narrower than {low} bits "
            "lose the sign, wider than 8 cost more than they gain; use 'auto' to "
            "let the calibration choose)"
        )


class ModuleNotCompiledError(NotCompiledError, AttributeError):
    """A `QuantizedModule` needs its circuit (or a model) for this (Concrete ML raises
    AttributeError here, so `except NotCompiledError` and `except AttributeError` both catch it)."""


class ModelTypeError(OptionError, AssertionError):
    """A compile function was given a model or option of the wrong kind (Concrete ML raises
    AssertionError here, so both `except OptionError` and `except AssertionError` catch it)."""


class RoundingKeyError(OptionError, KeyError):
    """`rounding_threshold_bits` has keys other than 'n_bits' and 'method'."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class _ValueRecorder:
    """Context manager: while the integer program runs, record each operation's float value."""

    def __init__(self, quantized: QuantizedModule, values: Dict[str, Dict[Any, np.ndarray]]):
        self.program = quantized.program
        self.values = values

    def __enter__(self) -> None:
        from .quantization.program import is_encrypted

        original = self.program._call

        def recording_call(node: fx.Node, env: Dict[fx.Node, Any]) -> Any:
            result = original(node, env)
            if is_encrypted(result):
                floats = result.value_fn()(result.expr)
                self.values[node_label(node)] = {"output": np.asarray(floats, dtype=np.float64)}
            return result

        self.program._call = recording_call

    def __exit__(self, *exc: Any) -> None:
        del self.program._call  # back to the class's method


_recording_values = _ValueRecorder


def dumps(quantized_module: QuantizedModule) -> str:
    """`QuantizedModule.dumps` as a function (Concrete ML's serialization entry point)."""
    return quantized_module.dumps()


def dump(quantized_module: QuantizedModule, file: Any) -> None:
    """`QuantizedModule.dump` as a function."""
    quantized_module.dump(file)


def loads(text: str) -> QuantizedModule:
    """A QuantizedModule from `dumps`' string."""
    return QuantizedModule.loads(text)


def load(file: Any) -> QuantizedModule:
    """A QuantizedModule from a file written by `dump`."""
    return QuantizedModule.load(file)


def _has_brevitas_layers(model: Any) -> bool:
    from .qat import _brevitas_layer_types

    types = _brevitas_layer_types()
    return (
        bool(types)
        and isinstance(model, torch.nn.Module)
        and any(isinstance(module, types) for module in model.modules())
    )


def _export_qonnx(model: torch.nn.Module, inputset: InputSet, path: Path) -> None:
    """Write the Brevitas model as QONNX (Concrete ML's `output_onnx_file`)."""
    from brevitas.export import export_qonnx

    example = tuple(t[:1] for t in batches(inputset)[0])
    was_training = model.training
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_qonnx(model.eval(), example[0] if len(example) == 1 else example, export_path=str(path))
    except ModuleNotFoundError as error:  # Brevitas' ONNX export needs onnxoptimizer
        warnings.warn(
            f"fhe_backend: output_onnx_file '{path}' was not written: {error} "
            "(pip install onnxoptimizer); the compilation does not need it",
            stacklevel=3,
        )
    finally:
        model.train(was_training)


def _as_array(value: Any) -> Any:
    return value if isinstance(value, (torch.Tensor, np.ndarray)) else np.asarray(value, dtype=np.float64)


def _single_or_tuple(values: Sequence[Any]) -> Any:
    return values[0] if len(values) == 1 else tuple(values)


# ---- ONNX -> torch ----------------------------------------------------------------------


class OnnxModule(torch.nn.Module):
    """An ONNX graph evaluated with torch operations, so it is captured like any torch model.

    Float initializers become buffers (the circuit's clear constants); integer initializers and
    constants (as `torch.onnx.export` writes a Reshape's shape or an Unsqueeze's axes) and
    `Shape` results stay Python values, so shape arithmetic is resolved while tracing.
    """

    def __init__(self, onnx_model: Any):
        super().__init__()
        import onnx
        from onnx import numpy_helper

        if not isinstance(onnx_model, onnx.ModelProto):
            raise OptionError(f"expected an onnx.ModelProto, got {type(onnx_model).__name__}")
        graph = onnx_model.graph
        self.values: Dict[str, Any] = {}
        self.buffer_names: Dict[str, str] = {}
        for index, initializer in enumerate(graph.initializer):
            array = numpy_helper.to_array(initializer).copy()
            if np.issubdtype(array.dtype, np.floating):
                name = f"initializer_{index}"
                self.register_buffer(name, torch.from_numpy(array).float(), persistent=False)
                self.buffer_names[initializer.name] = name
            else:
                self.values[initializer.name] = _python_value(array)
        known = set(self.values) | set(self.buffer_names)
        self.input_names = [i.name for i in graph.input if i.name not in known]
        self.output_names = [o.name for o in graph.output]
        self.nodes = [
            (
                node.op_type,
                list(node.input),
                list(node.output),
                {a.name: _onnx_attribute(a) for a in node.attribute},
                node.name,
            )
            for node in graph.node
        ]
        self.nodes = _fuse_log_sigmoid(self.nodes)
        unknown = sorted({op for op, *_ in self.nodes} - set(ONNX_OPS))
        if unknown:
            raise UnsupportedOpError(
                f"ONNX operator(s) {unknown} have no torch equivalent in "
                f"fhe_backend.compile; supported: {sorted(ONNX_OPS)}"
            )

    def forward(self, *inputs: torch.Tensor) -> Any:
        """Run the ONNX graph node by node."""
        env: Dict[str, Any] = dict(self.values)
        env.update({name: getattr(self, buffer) for name, buffer in self.buffer_names.items()})
        env.update(zip(self.input_names, inputs))
        for op, input_names, output_names, attributes, name in self.nodes:
            args = [env[i] if i else None for i in input_names]
            if op not in ONNX_OPS_ON_PYTHON_VALUES:  # a torch op: integer constants as tensors
                args = [torch.tensor(a) if isinstance(a, list) else a for a in args]
            try:
                result = ONNX_OPS[op](*args, **attributes)
            except Exception as error:
                raise UnsupportedOpError(
                    f"ONNX node '{name}' ({op}) failed in torch: {type(error).__name__}: {error}"
                ) from error
            results = result if len(output_names) > 1 else (result,)
            env.update(zip(output_names, results))
        outputs = tuple(env[name] for name in self.output_names)
        return _single_or_tuple(outputs)


def _onnx_attribute(attribute: Any) -> Any:
    from onnx import helper, numpy_helper

    value = helper.get_attribute_value(attribute)
    if hasattr(value, "data_type"):  # a TensorProto
        array = numpy_helper.to_array(value).copy()
        return torch.from_numpy(array) if np.issubdtype(array.dtype, np.floating) else _python_value(array)
    return value.decode() if isinstance(value, bytes) else value


def _fuse_log_sigmoid(nodes: List[Tuple[Any, ...]]) -> List[Tuple[Any, ...]]:
    """`torch.onnx.export` writes LogSigmoid as Sigmoid then Log; evaluated as two float32 ops,
    log(sigmoid(-200)) is -inf (an unquantizable range) where log_sigmoid is -200."""
    readers: Dict[str, int] = {}
    for _, inputs, *_ in nodes:
        for name in inputs:
            readers[name] = readers.get(name, 0) + 1
    sigmoids = {outputs[0]: inputs for op, inputs, outputs, *_ in nodes if op == "Sigmoid"}
    fused = {
        inputs[0]
        for op, inputs, *_ in nodes
        if op == "Log" and inputs[0] in sigmoids and readers[inputs[0]] == 1
    }
    result = []
    for op, inputs, outputs, attributes, name in nodes:
        if op == "Sigmoid" and outputs[0] in fused:
            continue
        if op == "Log" and inputs[0] in fused:
            op, inputs = "LogSigmoid", sigmoids[inputs[0]]
        result.append((op, inputs, outputs, attributes, name))
    return result


def _python_value(array: np.ndarray) -> Any:
    """An integer (or boolean) ONNX constant as a Python int or nested list: a constant to
    dynamo, where a tensor's values read while tracing would be data-dependent."""
    return array.tolist()


def _ints(value: Any) -> List[Any]:
    """A shape-like value (Python sequence or integer tensor) as a list."""
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _axis_or(attribute: Any, tensor: Any) -> Optional[List[int]]:
    """Axes given as an attribute (old opsets) or as an input tensor (opset >= 13)."""
    if tensor is not None:
        return _ints(tensor)
    return list(attribute) if attribute is not None else None


def _gemm(a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0):
    a = a.transpose(-1, -2) if transA else a
    b = b.transpose(-1, -2) if transB else b
    y = alpha * (a @ b) if alpha != 1.0 else a @ b
    return y if c is None else y + (beta * c if beta != 1.0 else c)


def _torch_pads(pads: Sequence[int]) -> List[int]:
    """ONNX pads [x1_begin, x2_begin, ..., x1_end, x2_end, ...] -> F.pad's last-dim-first order."""
    half = len(pads) // 2
    result = []
    for dim in reversed(range(half)):
        result += [pads[dim], pads[dim + half]]
    return result


def _spatial(x, kernel_shape, pads, fn, **kwargs):
    """Pad (symmetric pads through the op, the rest through F.pad) then run a window op."""
    dims = len(kernel_shape)
    pads = list(pads or [0] * 2 * dims)
    if pads[:dims] == pads[dims:]:
        return fn(x, padding=pads[:dims], **kwargs)
    return fn(F.pad(x, _torch_pads(pads)), padding=0, **kwargs)


def _conv(
    x, w, b=None, dilations=None, group=1, kernel_shape=None, pads=None, strides=None, auto_pad="NOTSET"
):
    dims = w.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return _spatial(
        x,
        kernel_shape or list(w.shape[2:]),
        pads,
        lambda t, padding: conv(
            t, w, b, stride=strides or 1, padding=padding, dilation=dilations or 1, groups=group
        ),
    )


def _average_pool(
    x, kernel_shape, pads=None, strides=None, ceil_mode=0, count_include_pad=0, auto_pad="NOTSET"
):
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel_shape)]
    return _spatial(
        x,
        kernel_shape,
        pads,
        lambda t, padding: pool(
            t, kernel_shape, strides or kernel_shape, padding, bool(ceil_mode), bool(count_include_pad)
        ),
    )


def _max_pool(
    x, kernel_shape, pads=None, strides=None, ceil_mode=0, dilations=None, auto_pad="NOTSET", storage_order=0
):
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel_shape)]
    return _spatial(
        x,
        kernel_shape,
        pads,
        lambda t, padding: pool(
            t, kernel_shape, strides or kernel_shape, padding, dilations or 1, bool(ceil_mode)
        ),
    )


def _reshape(x, shape, allowzero=0):
    sizes = _ints(shape)
    sizes = [x.shape[i] if s == 0 and not allowzero else s for i, s in enumerate(sizes)]
    return x.reshape(sizes)


def _flatten(x, axis=1):
    axis = axis % x.dim() if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _squeeze(x, axes=None, axes_attribute=None):
    axes = _axis_or(axes_attribute, axes)
    return x.squeeze() if axes is None else x.squeeze(tuple(a % x.dim() for a in axes))


def _unsqueeze(x, axes=None, axes_attribute=None):
    axes = _axis_or(axes_attribute, axes)
    if not isinstance(x, torch.Tensor):  # shape arithmetic on Python values
        return [x]
    for axis in sorted(a % (x.dim() + len(axes)) for a in axes):
        x = x.unsqueeze(axis)
    return x


def _concat(*xs, axis=0):
    if any(not isinstance(x, torch.Tensor) for x in xs):
        return [v for x in xs for v in _ints(x)]
    return torch.cat(xs, dim=axis)


def _gather(x, indices, axis=0):
    scalar = isinstance(indices, int) or (isinstance(indices, torch.Tensor) and indices.dim() == 0)
    if not isinstance(x, torch.Tensor):
        picked = [x[i] for i in _ints(indices)]
        return picked[0] if scalar else picked
    if scalar:
        return x.select(axis, int(indices))
    indices = torch.as_tensor(indices)
    flat = torch.index_select(x, axis, indices.reshape(-1).long() % x.shape[axis])
    return flat.reshape(*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :])


def _slice(x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[axis] = slice(start, min(end, x.shape[axis]) if end > 0 else end, step)
    return x[tuple(index)]


def _clip(x, low=None, high=None, min=None, max=None):  # noqa: A002 - ONNX attribute names
    low = low if low is not None else min
    high = high if high is not None else max
    return torch.clamp(x, None if low is None else float(low), None if high is None else float(high))


def _reduce(fn):
    def reduce(x, axes=None, keepdims=1, noop_with_empty_axes=0, axes_attribute=None):
        axes = _axis_or(axes_attribute, axes)
        return fn(x, dim=tuple(axes) if axes else tuple(range(x.dim())), keepdim=bool(keepdims))

    return reduce


def _with_axes_attribute(fn):
    """ONNX ops whose `axes` moved from an attribute to an input in opset 13."""

    def call(x, axes=None, **attributes):
        if "axes" in attributes:
            attributes["axes_attribute"] = attributes.pop("axes")
        return fn(x, axes, **attributes)

    return call


def _variadic(fn):
    def call(*xs):
        result = xs[0]
        for x in xs[1:]:
            result = fn(result, x)
        return result

    return call


def _cast(x, to, saturate=1):
    from onnx import TensorProto

    dtypes = {
        TensorProto.FLOAT: torch.float32,
        TensorProto.DOUBLE: torch.float64,
        TensorProto.INT64: torch.int64,
        TensorProto.INT32: torch.int32,
        TensorProto.BOOL: torch.bool,
        TensorProto.FLOAT16: torch.float16,
    }
    return x.to(dtypes[to]) if isinstance(x, torch.Tensor) else x


def _constant(value=None, value_float=None, value_floats=None, value_int=None, value_ints=None):
    for candidate in (value, value_float, value_floats, value_int, value_ints):
        if candidate is not None:
            if isinstance(candidate, float) or (
                isinstance(candidate, list) and any(isinstance(v, float) for v in candidate)
            ):
                return torch.tensor(candidate)
            return candidate  # a float tensor, or integers kept as Python values
    raise UnsupportedOpError("ONNX Constant without a value")


ONNX_OPS = {
    "Abs": torch.abs,
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": torch.div,
    "Neg": torch.neg,
    "Pow": torch.pow,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Erf": torch.erf,
    "Sign": torch.sign,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,
    "Reciprocal": torch.reciprocal,
    "Not": torch.logical_not,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Equal": torch.eq,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Where": torch.where,
    "Min": _variadic(torch.minimum),
    "Max": _variadic(torch.maximum),
    "Sum": _variadic(torch.add),
    "MatMul": torch.matmul,
    "Gemm": _gemm,
    "Relu": F.relu,
    "Sigmoid": torch.sigmoid,
    "LogSigmoid": F.logsigmoid,  # Sigmoid then Log, fused by _fuse_log_sigmoid
    "Tanh": torch.tanh,
    "Softplus": F.softplus,
    "Softsign": F.softsign,
    "Mish": F.mish,
    "HardSwish": F.hardswish,
    "LeakyRelu": lambda x, alpha=0.01: F.leaky_relu(x, alpha),
    "Elu": lambda x, alpha=1.0: F.elu(x, alpha),
    "Celu": lambda x, alpha=1.0: F.celu(x, alpha),
    "Selu": lambda x, alpha=1.6732632423543772, gamma=1.0507009873554805: (
        gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))
    ),
    "HardSigmoid": lambda x, alpha=0.2, beta=0.5: torch.clamp(alpha * x + beta, 0.0, 1.0),
    "ThresholdedRelu": lambda x, alpha=1.0: torch.where(x > alpha, x, torch.zeros_like(x)),
    "PRelu": lambda x, slope: torch.where(x >= 0, x, slope * x),
    "Softmax": lambda x, axis=-1: torch.softmax(x, axis),
    "Clip": _clip,
    "Conv": _conv,
    "AveragePool": _average_pool,
    "MaxPool": _max_pool,
    "GlobalAveragePool": lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "BatchNormalization": lambda x, scale, bias, mean, var, epsilon=1e-5, momentum=0.9, training_mode=0: (
        F.batch_norm(x, mean, var, scale, bias, False, 0.0, epsilon)
    ),
    "Pad": lambda x, pads, constant_value=None, axes=None, mode="constant": F.pad(
        x, _torch_pads(_ints(pads)), mode, 0.0 if constant_value is None else float(constant_value)
    ),
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": lambda x, perm=None: x.permute(perm or list(reversed(range(x.dim())))),
    "Squeeze": _with_axes_attribute(_squeeze),
    "Unsqueeze": _with_axes_attribute(_unsqueeze),
    "Concat": _concat,
    "Gather": _gather,
    "Slice": _slice,
    "Cast": _cast,
    "Identity": lambda x: x,
    "Dropout": lambda x, *rest, **attributes: x,
    "Constant": _constant,
    "Shape": lambda x, start=0, end=None: list(x.shape)[start:end],
    "ReduceSum": _with_axes_attribute(_reduce(torch.sum)),
    "ReduceMean": _with_axes_attribute(_reduce(torch.mean)),
}
# ops that take shapes, axes or indices as Python values (the others get tensors)
ONNX_OPS_ON_PYTHON_VALUES = frozenset(
    {
        "Pad",
        "Reshape",
        "Squeeze",
        "Unsqueeze",
        "Concat",
        "Gather",
        "Slice",
        "Cast",
        "Identity",
        "Constant",
        "Shape",
        "ReduceSum",
        "ReduceMean",
    }
)


__all__ = [
    "OPSET_VERSION_FOR_ONNX_EXPORT",
    "ModuleNotCompiledError",
    "OnnxModule",
    "QuantizedModule",
    "build_quantized_module",
    "compile_brevitas_qat_model",
    "compile_onnx_model",
    "compile_torch_model",
    "convert_torch_tensor_or_numpy_array_to_numpy_array",
    "dump",
    "dumps",
    "has_any_qnn_layers",
    "load",
    "loads",
]
