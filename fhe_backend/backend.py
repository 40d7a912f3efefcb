"""The `fhe` torch.compile backend: capture -> passes -> partition -> quantize -> lower -> stitch.

Dynamo hands over an FX graph; AOTAutograd lowers it to core ATen. Parameters and buffers
reaching the graph as inputs are baked as constants (the server's weights are clear constants
of the circuit). Graph passes run, supported nodes of the FHE target are fused into
`FhePartition`s, calibrated on the inputset, quantized, lowered and compiled with Concrete;
the rest of the graph stays eager torch.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
import warnings
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from functorch.compile import aot_module_simplified
from torch._decomp import core_aten_decompositions
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from .dynamo_compat import fhe_compile_wrapper
from .dynamo_compat import install as install_safe_options_comparison
from .errors import FheBackendError, OptionError, surfaced
from .graph_utils import solve_symbol, symbolic_expr
from .partition import TargetGroup, TorchNode, fhe_partitions, partition
from .passes import PassManager
from .quantization.calibration import batches
from .replay import Replay, dynamo_call, fed_by_call
from .runtime import FhePartition, fhe_mode
from .settings import MIN_RECOMMENDED_INPUTSET, FheSettings, check_encryption_status
from .skipped_frames import install as install_skipped_frame_checks
from .skipped_frames import note_capture

logger = logging.getLogger("fhe_backend")

_CONSTANT_SOURCE = re.compile(r"\._(parameters|buffers)\[|\.(weight|bias)$")
# _safe_softmax stays one node (its decomposition compares with -inf): the masked_softmax pass
# and the softmax lowering take it whole
DECOMPOSITIONS = {
    op: fn for op, fn in core_aten_decompositions().items() if op is not torch.ops.aten._safe_softmax.default
}

# calibration of a static graph: samples per call once the graph proved batch-agnostic
CALIBRATION_CHUNK = 256
PROBE_BATCHES = 4


_SESSION_NUMBERS = itertools.count()


class CompileSession:
    """The state of one `torch.compile(model, backend="fhe", options=...)` call.

    Dynamo calls the backend once per captured graph and again for each recompilation (a new
    batch size); all these calls get the same `options` dict, which identifies the session. The
    session keeps its graphs, the partitions they may share (equal subgraphs compiled for another
    batch size), and the mode chosen with `set_fhe_mode`. Nothing is found again through a
    model's identity: another `torch.compile` call of the same model, with other options, gets a
    fresh session and never reuses circuits or keys compiled for this one.
    """

    def __init__(self, options: Optional[Dict], settings: FheSettings):
        self.options = options  # held: its id() stays unique while the session lives
        self.settings = settings
        self.graphs: List["weakref.ref[CompiledGraph]"] = []
        self.reusable: Dict[Any, "weakref.ref[FhePartition]"] = {}
        self.mode: Optional[str] = None
        self.number = next(_SESSION_NUMBERS)  # creation order
        self.replay: Optional[Replay] = None  # runs the compiled model again (graph breaks)
        self.replay_batch_size: Optional[int] = None  # samples of the batch being replayed
        self._replay_thread: Optional[int] = None
        # (partition name, module path) -> the settings it fell back to (FhePartition._share_fallback)
        self.fallbacks: Dict[Tuple[str, str], Dict[str, Any]] = {}

    @property
    def replaying(self) -> bool:
        """True while the compiled model runs on the inputset to calibrate its graphs (in the
        thread that runs it: other threads' calls are ordinary calls)."""
        return self._replay_thread == threading.get_ident()

    def pending_partitions(self) -> List[FhePartition]:
        """Partitions of the session's graphs that have no integer program yet."""
        pending: List[FhePartition] = []
        for graph in self.compiled_graphs():
            pending.extend(p for p in graph.partitions if p.primary is None and not p.calibrated)
        return pending

    def calibrate_by_replay(self) -> None:
        """Run the compiled model on the inputset under fhe_mode("calibrate"): every graph, also
        those after a graph break, records the values that reach it; then each partition that
        recorded some is quantized and compiled. Graphs calibrated already run in float torch.

        The inputset is cut into batches of the size of the call being compiled, so that the
        model runs through the graphs dynamo compiled for it (see `Replay.chunks`).
        """
        inputset = self.replay.chunks(batches(self.settings.inputset))
        self._replay_thread = threading.get_ident()
        try:
            with torch.no_grad(), fhe_mode("calibrate"):
                for batch in inputset:
                    self.replay_batch_size = _batch_size(batch)
                    for partition_ in self.pending_partitions():
                        partition_.calibration_batch_size = self.replay_batch_size
                    self.replay(batch)
        finally:
            self.replay_batch_size, self._replay_thread = None, None
        recorded = [p for p in self.pending_partitions() if p.has_calibration_data]
        for index, partition_ in enumerate(recorded):
            _progress(self.settings, f"compiling {partition_.name} ({index + 1}/{len(recorded)})")
            partition_.compile()
        logger.info(
            "graphs after a graph break calibrated on %d batches of the inputset (%d partitions)",
            len(inputset),
            len(recorded),
        )

    def compiled_graphs(self) -> List["CompiledGraph"]:
        """The session's live graphs, oldest first."""
        return [g for g in (ref() for ref in self.graphs) if g is not None]

    def share_equal_partitions(self, partitions: List[FhePartition]) -> None:
        """Partitions equal to one compiled earlier in this session share it (never within one
        graph: equal subgraphs fed different data are quantized differently)."""
        new: Dict[Any, Any] = {}
        for partition_ in partitions:
            signature = partition_.signature()
            earlier = self.reusable.get(signature)
            earlier = earlier() if earlier is not None else None
            if earlier is not None:
                partition_.share(earlier)
            else:
                new.setdefault(signature, weakref.ref(partition_))
        self.reusable.update(new)


# sessions by id() of their options dict; a session lives as long as one of its graphs
_SESSIONS: "weakref.WeakValueDictionary[int, CompileSession]" = weakref.WeakValueDictionary()
# sessions by the parameters of the compiled model (weak on both sides), for partitions(model)
_MODEL_SESSIONS: WeakIdKeyDictionary = WeakIdKeyDictionary()
# the session of the graph compiled last (models without parameters)
_LAST_SESSION: List["weakref.ref[CompileSession]"] = []


def _session_for(options: Optional[Dict], settings: FheSettings, model_parameter: Any) -> CompileSession:
    session = _SESSIONS.get(id(options))
    if session is None or session.options is not options:
        session = CompileSession(options, settings)
        _SESSIONS[id(options)] = session
    if model_parameter is not None:
        _MODEL_SESSIONS.setdefault(model_parameter, weakref.WeakSet()).add(session)
    _LAST_SESSION[:] = [weakref.ref(session)]
    return session


class CompiledGraph(torch.nn.Module):
    """The runnable result of one captured graph: eager torch with FHE partitions inside."""

    def __init__(
        self,
        split: fx.GraphModule,
        partitions: List[FhePartition],
        left_in_torch: List[TorchNode],
        user_inputs: List[fx.Node],
        settings: FheSettings,
    ):
        super().__init__()
        self.split = split
        self.partitions = partitions
        self.left_in_torch = left_in_torch
        self.user_inputs = user_inputs
        self.settings = settings
        self.session: Optional[CompileSession] = None  # set by the backend; keeps it alive
        # the inputset does not reach this graph as it is (a graph after a break): calibrated by
        # running the compiled model on the inputset at its first call (CompileSession.replay)
        self.calibrate_by_replay = False

    def calibrate(self, inputset: Any, compile_circuits: bool = True) -> None:
        """Calibrate every partition on the inputset and compile their circuits.

        With `compile_circuits=False` the partitions are only quantized (integer programs, no
        circuits): the disable mode works, the others need `FhePartition.compile_circuit`.
        """
        pending = [p for p in self.partitions if p.primary is None and not p.calibrated]
        if not pending:
            return
        samples = 0
        with fhe_mode("calibrate"):
            for batch in self._traced_batches([self._conformed(b) for b in batches(inputset)]):
                args = self._bind(batch)
                size = _batch_size(batch)
                samples += size
                for partition_ in pending:
                    partition_.calibration_batch_size = size
                self.split(*args)
        if samples < MIN_RECOMMENDED_INPUTSET:
            warnings.warn(
                f"fhe_backend: the inputset has {samples} samples; a representative "
                f"inputset of hundreds of samples (>= {MIN_RECOMMENDED_INPUTSET}) is "
                "needed for accuracy",
                stacklevel=3,
            )
        for index, partition_ in enumerate(pending):
            if compile_circuits:
                _progress(self.settings, f"compiling {partition_.name} ({index + 1}/{len(pending)})")
            partition_.compile(circuit=compile_circuits)

    def _traced_batches(self, inputset: List[tuple]) -> List[tuple]:
        """Re-batch the inputset to the traced batch size when the graph has static shapes (or
        a symbolic batch size tied to another dimension, see `_traced_batch_size`).

        The last chunk is completed with samples from the start (they only repeat ranges).
        When the graph runs unchanged on several traced batches at once (checked on a probe),
        calibration takes chunks of CALIBRATION_CHUNK samples instead of one batch per call.
        """
        tensors = [n.meta["val"] for n in self.user_inputs if isinstance(n.meta.get("val"), torch.Tensor)]
        if not tensors or not tensors[0].dim():
            return inputset
        size = _traced_batch_size(tensors)
        if size is None:
            return inputset
        columns = [torch.cat(column) for column in zip(*inputset)]
        total = columns[0].shape[0]
        probe = torch.arange(PROBE_BATCHES * size) % total
        if total > size and self._batch_agnostic([c[probe] for c in columns], size):
            size *= max(1, min(CALIBRATION_CHUNK, total) // size)
        cyclic = torch.arange(-(-total // size) * size) % total
        columns = [column[cyclic] for column in columns]
        return [tuple(c[i : i + size] for c in columns) for i in range(0, len(cyclic), size)]

    def _batch_agnostic(self, probe: List[torch.Tensor], size: int) -> bool:
        """True when the graph (in torch) gives on the probe as one batch what it gives batch by
        batch of the traced `size`: no shape is baked in and no sample leaks into another."""
        try:
            with torch.no_grad(), fhe_mode("torch"):
                whole = self.split(*self._bind(probe))
                pieces = [
                    self.split(*self._bind([c[i : i + size] for c in probe]))
                    for i in range(0, probe[0].shape[0], size)
                ]
        except Exception:  # noqa: BLE001 - any failure means: keep the traced batch size
            return False
        outputs = [tree_leaves(piece) for piece in pieces]
        for index, value in enumerate(tree_leaves(whole)):
            if not isinstance(value, torch.Tensor):
                continue
            parts = [o[index] for o in outputs]
            if not value.dim() or not all(isinstance(p, torch.Tensor) and p.dim() for p in parts):
                return False
            stacked = torch.cat(parts)
            if stacked.shape != value.shape or not torch.allclose(stacked, value, rtol=1e-4, atol=1e-5):
                return False
        return True

    def _conformed(self, batch: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        """One inputset batch made to fit the traced inputs, or an OptionError saying how not.

        A single sample (one dim less than traced) becomes a batch of one; floats of another
        precision (float64 from numpy) are cast to the traced dtype; anything else that does
        not match the traced per-sample shape or kind of dtype is refused.
        """
        nodes = [n for n in self.user_inputs if isinstance(n.meta.get("val"), torch.Tensor)]
        if len(batch) != len(nodes):
            raise OptionError(
                f"inputset batches have {len(batch)} tensor(s) but the model takes "
                f"{len(nodes)} tensor input(s)"
            )
        conformed = []
        for node, tensor in zip(nodes, batch):
            traced = node.meta["val"]
            if tensor.dim() == traced.dim() - 1:
                tensor = tensor.unsqueeze(0)
            per_sample = ["N"] + [int(s) if isinstance(s, int) else "?" for s in traced.shape[1:]]
            if tensor.dim() != traced.dim() or any(
                isinstance(s, int) and tensor.shape[d] != s for d, s in enumerate(traced.shape) if d
            ):
                raise OptionError(
                    f"inputset: a batch for input '{node.name}' has shape {tuple(tensor.shape)}, the "
                    f"model takes ({', '.join(map(str, per_sample))}) (N samples on dim 0)"
                )
            if tensor.dtype != traced.dtype:
                if tensor.is_floating_point() != traced.dtype.is_floating_point:
                    raise OptionError(
                        f"inputset: input '{node.name}' has dtype {tensor.dtype}, the model "
                        f"takes {traced.dtype}"
                    )
                tensor = tensor.to(traced.dtype)
            conformed.append(tensor)
        return tuple(conformed)

    def _bind(self, tensors: Sequence[torch.Tensor]) -> List[Any]:
        """Arguments of the split graph for user tensors: symbolic sizes solved from shapes."""
        tensor_nodes = [n for n in self.user_inputs if isinstance(n.meta.get("val"), torch.Tensor)]
        if len(tensors) != len(tensor_nodes):
            raise OptionError(
                f"inputset batches have {len(tensors)} tensor(s) but the model takes "
                f"{len(tensor_nodes)} tensor input(s)"
            )
        by_node = dict(zip(tensor_nodes, tensors))
        args = []
        for node in self.user_inputs:
            if node in by_node:
                args.append(by_node[node])
            else:
                args.append(solve_symbol(node, by_node))
        return args

    def forward(self, *args: Any) -> Any:
        """Run the graph; on the first call, calibrate it first: a graph after a graph break on
        the values that reach it when the model runs on the inputset, without an inputset on
        these inputs."""
        session = self.session
        if session is not None and session.replaying:
            return self._replay_step(session, args)
        if any(not p.calibrated for p in self.partitions):
            replay = session.replay if session is not None else None
            if self.calibrate_by_replay and replay is not None and replay.alive:
                session.calibrate_by_replay()
        if any(not p.calibrated for p in self.partitions):
            if self.calibrate_by_replay:
                message = (
                    "fhe_backend: the inputset never reached this graph (it follows a graph break, "
                    "e.g. a branch the inputset did not take): calibrating it on this call's inputs "
                    "only; give an inputset that runs through every branch"
                )
            else:
                message = (
                    "fhe_backend: no 'inputset' option, calibrating on the first call's "
                    "inputs; pass a representative inputset (hundreds of samples) for accuracy"
                )
            warnings.warn(message, stacklevel=2)
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.calibrate([tuple(tensors)])
        return self.split(*args)

    def _replay_step(self, session: CompileSession, args: Sequence[Any]) -> Any:
        """One call while the session replays the inputset: graphs still to calibrate record
        their inputs (fhe_mode "calibrate"), calibrated ones run the float torch graph."""
        pending = [p for p in self.partitions if not p.calibrated]
        if not pending:
            with fhe_mode("torch"):
                return self.split(*args)
        for partition_ in pending:
            (partition_.primary or partition_).calibration_batch_size = session.replay_batch_size
        return self.split(*args)


install_skipped_frame_checks()
install_safe_options_comparison()


def fhe_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Optional[Dict] = None):
    """The `torch.compile(backend="fhe", options=...)` entry point.

    The package's own errors reach the caller as they are (an `OptionError` is a `ValueError`),
    not wrapped in dynamo's `BackendCompilerFailed`.
    """
    try:
        return _capture(gm, example_inputs, options)
    except FheBackendError as error:
        raise surfaced(error) from error.__cause__


def _capture(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Optional[Dict]):
    note_capture()
    settings = FheSettings.from_options(options)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    own = list(dict(gm.named_parameters(remove_duplicate=False)).values()) + list(
        dict(gm.named_buffers(remove_duplicate=False)).values()
    )
    constant_flags = [True] * len(own) + [
        _is_constant_input(n, x) for n, x in zip(placeholders, example_inputs)
    ]
    constants = [t.detach() for t in own] + [
        x.detach() if isinstance(x, torch.Tensor) else x for x in example_inputs
    ]
    start = time.perf_counter()
    session = _session_for(options, settings, _model_parameter([*own, *example_inputs]))
    sources = [*own, *example_inputs]
    if torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad and not flag
        for x, flag in zip(sources, constant_flags)
    ):
        warnings.warn(
            "fhe_backend: an input requires grad, but FHE partitions do not propagate "
            "gradients: the compiled model's outputs are cut from autograd. Call it under "
            "torch.no_grad() (for training with frozen layers in FHE, see fhe_backend.lora)",
            stacklevel=3,
        )

    call = dynamo_call(options) if settings.inputset is not None else None
    if call is not None and session.replay is None:
        session.replay = call[0]
    # a graph whose inputs are not the tensors the model was called with follows a graph break:
    # the inputset does not reach it as it is (calibrated by replaying the model, at its first call)
    after_break = call is not None and not fed_by_call(
        [x for x, flag in zip(sources, constant_flags) if not flag], call[1]
    )

    def compile_for(aten_gm: fx.GraphModule, values: Sequence[Any]) -> CompiledGraph:
        with unset_fake_temporarily():
            compiled = compile_aten_graph(
                aten_gm, values, constant_flags, settings, session=session, calibrate=not after_break
            )
        compiled.calibrate_by_replay = after_break
        if session.mode is not None:
            for partition_ in compiled.partitions:
                partition_.mode = session.mode
        session.graphs.append(weakref.ref(compiled))
        return compiled

    def compile_forward(aten_gm: fx.GraphModule, _fake_args):
        pristine = _graph_copy(aten_gm)
        variants = [(_weights_seen(sources, constant_flags), compile_for(aten_gm, constants))]
        logger.info("captured and partitioned in %.2fs", time.perf_counter() - start)
        user = [i for i, flag in enumerate(constant_flags) if not flag]

        def for_weights(args: List[Any]) -> CompiledGraph:
            """The graph compiled for the weights in `args`: dynamo reuses a captured graph for
            every module of the same class (their parameters are graph inputs) and after
            in-place updates, while the circuits hold the weights they were compiled with."""
            for seen, compiled in variants:
                if _same_weights(seen, args):
                    return compiled
            if any(_same_weights(seen, args, check_versions=False) for seen, _ in variants):
                warnings.warn(
                    "fhe_backend: the compiled model's weights changed in place since its "
                    "circuits were compiled: compiling them again for the new weights",
                    stacklevel=4,
                )
            else:
                logger.info("captured graph called with another module's weights: compiling for them")
            values = [
                a.detach() if flag and isinstance(a, torch.Tensor) else a
                for a, flag in zip(args, constant_flags)
            ]
            variants.append((_weights_seen(args, constant_flags), compile_for(_graph_copy(pristine), values)))
            del variants[1:-MAX_WEIGHT_VARIANTS]
            return variants[-1][1]

        def run(args):
            outputs = for_weights(args)(*[args[i] for i in user])
            args.clear()
            return outputs

        run._boxed_call = True  # type: ignore[attr-defined]  # AOTAutograd's boxed calling convention
        run.compiled_graph = variants[0][1]  # type: ignore[attr-defined]
        return run

    with torch.no_grad():
        return aot_module_simplified(
            gm, list(example_inputs), fw_compiler=compile_forward, decompositions=DECOMPOSITIONS
        )


# graphs kept per captured graph for other weights (other modules of the class, updates)
MAX_WEIGHT_VARIANTS = 4


def _graph_copy(graph_module: fx.GraphModule) -> fx.GraphModule:
    """A copy of a graph module that later passes may mutate (nodes copied, tensors shared;
    a deepcopy would copy the fake tensors in the nodes' meta, which fails for some)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(graph_module.graph, {}))
    graph._codegen = graph_module.graph._codegen  # noqa: SLF001 - keep the calling convention
    return fx.GraphModule(graph_module, graph)


def _weights_seen(values: Sequence[Any], constant_flags: Sequence[bool]) -> List[Any]:
    """Identity (weakly) and version counter of each tensor baked as a constant."""
    return [
        (weakref.ref(v), v._version) if flag and isinstance(v, torch.Tensor) else None
        for v, flag in zip(values, constant_flags)
    ]


def _same_weights(seen: List[Any], args: Sequence[Any], check_versions: bool = True) -> bool:
    """True when `args` carry the very tensors baked in (unchanged, with `check_versions`)."""
    return all(
        entry is None or (entry[0]() is arg and (not check_versions or arg._version == entry[1]))
        for entry, arg in zip(seen, args)
    )


def _is_constant_input(node: fx.Node, example: Any) -> bool:
    if isinstance(example, torch.nn.Parameter):
        return True
    grapharg = node.meta.get("grapharg")
    source = getattr(getattr(grapharg, "source", None), "name", "")
    source = source() if callable(source) else source
    return bool(_CONSTANT_SOURCE.search(str(source)))


def compile_aten_graph(
    aten_gm: fx.GraphModule,
    values: Sequence[Any],
    constant_flags: Sequence[bool],
    settings: FheSettings,
    groups: Optional[List[TargetGroup]] = None,
    session: Optional[CompileSession] = None,
    calibrate: bool = True,
) -> CompiledGraph:
    """Bake constants, run the passes, partition, and calibrate/compile when an inputset is given
    (and `calibrate`: a graph after a graph break is calibrated later, see CompileSession.replay).

    Partitions equal to one compiled earlier in the same `session` (dynamo recompiling the
    same model for another batch size) share its circuit and keys instead of recompiling.
    """
    placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    user_inputs = []
    for index, (node, is_constant) in enumerate(zip(placeholders, constant_flags)):
        if not is_constant:
            user_inputs.append(node)
            continue
        name = f"_fhe_constant_{index}"
        aten_gm.register_buffer(name, values[index].clone(), persistent=False)
        with aten_gm.graph.inserting_before(node):
            constant = aten_gm.graph.get_attr(name)
        constant.meta = dict(node.meta)
        node.replace_all_uses_with(constant)
        aten_gm.graph.erase_node(node)
    aten_gm.recompile()
    _refuse_training_mode(aten_gm)
    aten_gm = PassManager()(aten_gm, settings)
    from .marks import target_groups

    groups = groups if groups is not None else target_groups(aten_gm, settings)
    input_status = _input_status(user_inputs, settings)
    split, partitions, left = partition(aten_gm, groups, input_status)
    if session is not None:
        session.share_equal_partitions(partitions)
        for partition_ in partitions:
            partition_.session_ref = weakref.ref(session)
    compiled = CompiledGraph(split, partitions, left, user_inputs, settings)
    compiled.session = session
    if settings.inputset is not None and calibrate:
        compiled.calibrate(settings.inputset)
    return compiled


def _traced_batch_size(tensors: Sequence[torch.Tensor]) -> Optional[int]:
    """The batch size a graph holds to, or None when any batch size runs through it.

    A static dim 0 is that size. A symbolic one is free, unless its symbol also sizes another
    dimension: dynamo gives equal sizes one symbol ("duck sizing"), so a graph traced with
    `dynamic=True` on a batch of 2 sequences of 2 assumes every batch as long as its sequences
    (a guard that calibration, which runs the graph directly, would break). Such a graph gets
    batches of the traced size (the symbol's example value).
    """
    batch = tensors[0].shape[0]
    if isinstance(batch, int):
        return batch
    symbol = symbolic_expr(batch)
    tied = any(
        symbol in symbolic_expr(size).free_symbols
        for tensor in tensors
        for size in tensor.shape[1:]
        if symbolic_expr(size) is not None
    )
    return int(batch.node.hint) if tied and batch.node.hint is not None else None


# ops that exist only while a module is in training mode
_TRAINING_OPS = {
    "aten.native_dropout.default": "dropout",
    "aten._native_batch_norm_legit_functional.default": "batch norm with batch statistics",
}


def _refuse_training_mode(graph_module: fx.GraphModule) -> None:
    """Raise for a graph captured in training mode: its dropout / batch statistics have no
    FHE meaning (and would otherwise show up as unsupported ops)."""
    for node in graph_module.graph.nodes:
        what = _TRAINING_OPS.get(str(node.target)) if node.op == "call_function" else None
        if what is None:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        module = next(reversed(stack.values()))[0] if stack else "the model"
        raise OptionError(
            f"'{module}' runs {what} ({node.target}, node '{node.name}'): the model is in training "
            "mode. Call model.eval() before compiling (and before calling the compiled model)"
        )


def _input_status(user_inputs: List[fx.Node], settings: FheSettings) -> Dict[str, str]:
    tensors = [n for n in user_inputs if isinstance(n.meta.get("val"), torch.Tensor)]
    status = settings.inputs_encryption_status
    if status is None:
        return {}
    check_encryption_status(status, len(tensors))
    return {node.name: s for node, s in zip(tensors, status)}


def _batch_size(batch: Sequence[torch.Tensor]) -> int:
    return int(batch[0].shape[0]) if batch and batch[0].dim() else 1


def _progress(settings: FheSettings, message: str) -> None:
    logger.info(message)
    if settings.verbose:
        print(f"[fhe_backend] {message}")


def _model_parameter(values: Sequence[Any]) -> Optional[torch.Tensor]:
    """The compiled model's first parameter, which identifies it (weakly); None without any."""
    return next((v for v in values if isinstance(v, torch.nn.Parameter)), None)


def _sessions_of(model: Any) -> List[CompileSession]:
    """The sessions of a torch.compile'd model (its own one when it can be told) or of a module.

    For the object `torch.compile` returned, the session is the one of its options dict; for a
    plain module, every live session that compiled it; without parameters, the latest session.
    """
    options = _compile_options(model)
    if options is not _UNKNOWN:
        session = _SESSIONS.get(id(options))
        if session is not None and session.options is options:
            return [session]
    target = getattr(model, "_orig_mod", model)
    parameters = list(target.parameters()) if isinstance(target, torch.nn.Module) else []
    if not parameters:
        last = _LAST_SESSION[0]() if _LAST_SESSION else None
        return [last] if last is not None else []
    sessions = _MODEL_SESSIONS.get(parameters[0])
    return sorted(sessions or [], key=lambda s: s.number)


_UNKNOWN = object()


def _compile_options(model: Any) -> Any:
    """The options dict `torch.compile` was given for this compiled module, or _UNKNOWN (not
    compiled with backend "fhe": the lookup by parameters is used)."""
    wrapper = fhe_compile_wrapper(getattr(getattr(model, "dynamo_ctx", None), "callback", None))
    return wrapper.kwargs.get("options") if wrapper is not None else _UNKNOWN


def compiled_graphs(model: Any) -> List[CompiledGraph]:
    """The graphs compiled for a torch.compile'd model (or module), oldest first."""
    graphs: List[CompiledGraph] = []
    for session in _sessions_of(model):
        graphs.extend(g for g in session.compiled_graphs() if g not in graphs)
    return graphs


def partitions(model: Any) -> List[FhePartition]:
    """The FHE partitions of a compiled model (after its first call)."""
    if isinstance(model, torch.nn.Module) and fhe_partitions(model):
        return fhe_partitions(model)
    unique: List[FhePartition] = []
    for graph in compiled_graphs(model):
        for partition_ in graph.partitions:
            partition_ = partition_.primary or partition_
            if partition_ not in unique:
                unique.append(partition_)
    return unique


def set_fhe_mode(model: Any, mode: Any) -> None:
    """Switch every FHE partition of a compiled model to a mode (no recompilation).

    The mode also applies to graphs dynamo compiles later for this compiled model (new batch
    sizes). To run one call (or one thread) in another mode without changing the model's, use
    ``with fhe_backend.fhe_mode(mode): ...``.
    """
    mode = getattr(mode, "value", mode)
    for partition_ in partitions(model):
        partition_.mode = mode
    for session in _sessions_of(model):
        session.mode = mode
