"""The Concrete side of one FHE partition: its circuit, its keys, and running samples.

`CircuitRunner` compiles an integer program into a Concrete circuit, generates (or loads)
its keys, and runs per-sample integer inputs in ``simulate`` or ``execute``. Encrypted runs go
through a `SampleExecutor` chosen by the ``runner`` option: one sample after another
(``local``), one worker process per core (``processes``, `fhe_backend.process_executor`; the
default ``auto`` on a machine with several cores), a thread pool (``threads``: samples overlap
only in part, Python holds the GIL between Concrete's calls), or a Ray cluster (``ray``,
`fhe_backend.deployment.ray_runner`). Every executor encrypts and decrypts in this process:
private keys never leave it.

What the program means (quantization, rows per sample, errors naming lookups) stays with
`fhe_backend.runtime.FhePartition`, which owns one runner.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
from concrete import fhe
from concrete.fhe.dtypes import Integer
from concrete.fhe.representation import Graph, GraphProcessor
from concrete.fhe.representation.node import Operation

from .errors import KeyGenerationError, OptionError
from .exit_status import keep_python_sigpipe, note_configuration
from .graph_utils import as_tuple
from .output_dirs import remove_with_circuit
from .process_executor import ProcessExecutor
from .quantization.program import IntegerProgram
from .settings import FheSettings
from .simulation import Simulator

logger = logging.getLogger("fhe_backend")

Sample = Tuple[np.ndarray, ...]
# without a user Configuration, as Concrete ML: compressed input ciphertexts and evaluation
# keys (same circuit cost; a 64-feature input goes from about 4 MB to 1.5 KB)
DEFAULT_COMPRESSION = {"compress_input_ciphertexts": True, "compress_evaluation_keys": True}
COMPILE_INPUTSET = 100  # random samples given to Concrete besides the extreme ones


class SlicesKeepTheirSign(GraphProcessor):
    """Concrete's pre-processor that types a slice of a signed tensor as signed.

    Concrete 2.11 types every value from its measured bounds, so a slice that only ever held
    non-negative values becomes unsigned while the tensor it is cut from is signed; its MLIR
    then cuts an unsigned slice out of a signed tensor, which Concrete's own pipeline rejects
    ("Transforming FHE boolean ops failed"; the max tree of `lowering.linear` cut such slices).
    Typed signed, with the one more bit that takes, the slice reads the same values.
    """

    def apply(self, graph: Graph) -> None:
        """Retype, in place, every unsigned slice cut from a signed encrypted tensor."""
        for node in graph.query_nodes():
            if node.operation != Operation.Generic or node.properties.get("name") != "index_static":
                continue
            source, dtype = node.inputs[0].dtype, node.output.dtype
            if (
                isinstance(source, Integer)
                and isinstance(dtype, Integer)
                and source.is_signed
                and not dtype.is_signed
            ):
                # the successors' inputs are this same value, so they read the new type too
                dtype.is_signed, dtype.bit_width = True, dtype.bit_width + 1


def portable_server(circuit: fhe.Circuit) -> fhe.Server:
    """`circuit`'s server, its configuration (which an MLIR archive saves) without
    `SlicesKeepTheirSign`: the archive names no class of this package, so Concrete alone loads
    it. The MLIR it saves already holds the types the pre-processor gave."""
    server = circuit.server
    configuration = getattr(server, "_configuration", None)
    if configuration is not None:
        kept = [p for p in configuration.additional_pre_processors if not isinstance(p, SlicesKeepTheirSign)]
        server._configuration = configuration.fork(additional_pre_processors=kept)  # noqa: SLF001
    return server


class SampleExecutor(Protocol):
    """Runs a circuit with real keys on many samples (clear integers in, clear integers out)."""

    def execute(self, circuit: fhe.Circuit, samples: Sequence[Sample]) -> List[Sample]:
        """Encrypt each sample here, evaluate it, decrypt it here; results in sample order."""
        ...


class SequentialExecutor:
    """One sample after another, in this thread."""

    def execute(self, circuit: fhe.Circuit, samples: Sequence[Sample]) -> List[Sample]:
        """`encrypt_run_decrypt` on each sample in turn."""
        return [as_tuple(circuit.encrypt_run_decrypt(*sample)) for sample in samples]


class ThreadExecutor:
    """One worker thread per core (`workers`), each running whole samples (they overlap in part:
    1.0 to 1.96 cores busy on 2 cores, against 1.97-1.98 for `ProcessExecutor`)."""

    def __init__(self, workers: Optional[int] = None):
        self.workers = workers or os.cpu_count() or 1

    def execute(self, circuit: fhe.Circuit, samples: Sequence[Sample]) -> List[Sample]:
        """`encrypt_run_decrypt` on the samples, `workers` at a time, results in sample order."""
        if len(samples) < 2 or self.workers < 2:
            return SequentialExecutor().execute(circuit, samples)
        with ThreadPoolExecutor(min(self.workers, len(samples)), thread_name_prefix="fhe-execute") as pool:
            return list(pool.map(lambda sample: as_tuple(circuit.encrypt_run_decrypt(*sample)), samples))


# runner name -> factory; "ray" registers itself when its module is imported (optional extra)
EXECUTORS: Dict[str, Callable[[], SampleExecutor]] = {
    "local": SequentialExecutor,
    "threads": ThreadExecutor,
    "processes": ProcessExecutor,
}
LAZY_EXECUTORS = {"ray": "fhe_backend.deployment.ray_runner"}


def register_executor(name: str, factory: Callable[[], SampleExecutor]) -> None:
    """Make `options={"runner": name}` run encrypted samples through `factory()`'s executor."""
    EXECUTORS[name] = factory


def executor_for(name: str) -> SampleExecutor:
    """The executor of a ``runner`` option value (``auto``: ``processes`` on a machine with
    several cores, else ``local``)."""
    if name == "auto":
        name = "processes" if (os.cpu_count() or 1) > 1 else "local"
    if name not in EXECUTORS and name in LAZY_EXECUTORS:
        try:
            importlib.import_module(LAZY_EXECUTORS[name])
        except ImportError as error:
            raise OptionError(
                f"option 'runner' = {name!r} needs the optional dependency it names "
                f"(pip install 'fhe-backend[{name}]'): {error}"
            ) from error
    if name not in EXECUTORS:
        raise OptionError(
            f"option 'runner' = {name!r}: known runners are {sorted(set(EXECUTORS) | set(LAZY_EXECUTORS))}"
        )
    return EXECUTORS[name]()


class CircuitRunner:
    """The circuit of one partition, its keys, and its simulated or encrypted runs."""

    def __init__(self, name: str, settings: FheSettings, encryption_status: Sequence[str]):
        self.name = name
        self.settings = settings
        self.encryption_status = tuple(encryption_status)
        self.circuit: Optional[fhe.Circuit] = None
        self.keygen_seconds: Optional[float] = None
        self._keys_ready = False
        self._simulator: Optional[Simulator] = None

    # ---- compilation --------------------------------------------------------------------

    def compile(
        self,
        program: IntegerProgram,
        q_inputs: Sequence[np.ndarray],
        samples: List[Sample],
        artifacts: Any = None,
        simulation: bool = True,
    ) -> fhe.Circuit:
        """Compile `program` on its per-sample inputset; Concrete's errors propagate as raised
        (`CONCRETE_COMPILE_ERRORS`).

        `q_inputs` are the same samples batch-major (to find the extreme ones); `artifacts` (a
        `concrete.fhe.DebugArtifacts`) collects Concrete's graphs and MLIR. `simulation=False`
        skips building the simulator: the circuit then only gives its statistics (a few times
        faster; precision_search compares candidates this way).
        """
        bounding = self._bounding_samples(program, q_inputs, samples)
        _tracing_ready_in_this_thread()
        compiler = fhe.Compiler(
            _traceable(program, len(self.encryption_status)),
            {f"x{i}": status for i, status in enumerate(self.encryption_status)},
        )
        options = {**self._compile_options(), "fhe_simulation": simulation}
        self.circuit = compiler.compile(
            [s if len(s) > 1 else s[0] for s in bounding], artifacts=artifacts, **options
        )
        remove_with_circuit(self.circuit)
        self._keys_ready = False
        return self.circuit

    def _compile_options(self) -> Dict[str, Any]:
        """Concrete's compile options: the error probability (`FheSettings.error_budget`) and
        compression."""
        settings = self.settings
        options: Dict[str, Any] = dict(fhe_simulation=True, fhe_execution=False, show_mlir=settings.show_mlir)
        if settings.configuration is not None:
            options["configuration"] = settings.configuration
            note_configuration(settings.configuration)
        else:
            options.update(DEFAULT_COMPRESSION)
        for name, value in zip(("p_error", "global_p_error"), settings.error_budget()):
            if value is not None:
                options[name] = value
        user_processors = getattr(settings.configuration, "additional_pre_processors", None) or []
        options["additional_pre_processors"] = [*user_processors, SlicesKeepTheirSign()]
        return options

    @staticmethod
    def _bounding_samples(
        program: IntegerProgram, q_inputs: Sequence[np.ndarray], samples: List[Sample]
    ) -> List[Sample]:
        """The samples Concrete measures its bounds on: every sample where the calibration met
        the extreme input of a lookup or an output (so Concrete sizes them as the whole inputset
        does), plus COMPILE_INPUTSET others drawn at random. Concrete evaluates its graph sample
        by sample, so this subset is what keeps compilation fast on large inputsets."""
        if len(samples) <= COMPILE_INPUTSET:
            return samples
        extremes = program.extreme_samples(q_inputs, len(samples))
        drawn = np.random.default_rng(0).choice(len(samples), COMPILE_INPUTSET, replace=False)
        return [samples[i] for i in sorted(extremes | {int(i) for i in drawn})]

    # ---- keys ---------------------------------------------------------------------------

    @property
    def keys_ready(self) -> bool:
        """True once the keys of the current circuit are generated or loaded."""
        return self._keys_ready

    def keygen(self, force: bool = False) -> bool:
        """Generate (or load from the `key_cache_dir` option's folder) the circuit's keys, once.

        Returns True when keys were made or loaded by this call.
        """
        if self._keys_ready and not force:
            return False
        self.circuit.enable_fhe_execution()
        start = time.perf_counter()
        cache_dir = self.settings.key_cache_dir
        try:
            if cache_dir and not force:
                # the MLIR alone does not fix the crypto parameters (p_error, configuration): keys
                # of another circuit must never be loaded for this one
                digest = hashlib.sha256(
                    self.circuit.mlir.encode() + self.circuit.client.specs.serialize()
                ).hexdigest()[:16]
                path = Path(cache_dir) / f"{self.name}-{digest}.keys"
                path.parent.mkdir(parents=True, exist_ok=True)
                self.circuit.keys.load_if_exists_generate_and_save_otherwise(str(path))
            else:
                self.circuit.keygen(force=force)
        except RuntimeError as error:
            raise self._keygen_error(error) from error
        self._keys_ready = True
        self.keygen_seconds = time.perf_counter() - start
        return True

    def _keygen_error(self, error: RuntimeError) -> Exception:
        """Concrete's keygen error, with the key cache folders and their free space when keys
        are cached on disk: Concrete says "Failed to write message to ostream" or "Failed to
        serialize keys" when the disk is full."""
        configuration = self.settings.configuration
        folders = [self.settings.key_cache_dir]
        if getattr(configuration, "use_insecure_key_cache", False):
            folders.append(configuration.insecure_key_cache_location)
        folders = [folder for folder in folders if folder]
        if not folders:
            return error
        free = ", ".join(f"{folder} has {_free_bytes(folder) / 2**20:.0f} MiB free" for folder in folders)
        return KeyGenerationError(
            f"partition '{self.name}': generating or caching its keys failed ({error}). {free}: "
            "on a full disk, free space or cache keys in another folder; if a cached key file is "
            "damaged, delete it"
        )

    # ---- running ------------------------------------------------------------------------

    def run(self, samples: Sequence[Sample], mode: str) -> List[Sample]:
        """Per-sample integer outputs in ``simulate`` or ``execute`` (keys generated first)."""
        if mode == "execute":
            self.keygen()
            outputs = executor_for(self.settings.runner).execute(self.circuit, samples)
        else:
            if self._simulator is None or self._simulator.circuit is not self.circuit:
                self._simulator = Simulator(self.circuit)
            outputs = [as_tuple(self._simulator(*sample)) for sample in samples]
        keep_python_sigpipe()  # Concrete's runtime, now started, may have taken SIGPIPE
        return outputs

    # ---- inspection ---------------------------------------------------------------------

    @property
    def statistics(self) -> Dict[str, Any]:
        """Concrete's cost figures: pbs_count, max_bit_width, complexity, p_error, global_p_error."""
        circuit = self.circuit
        return {
            "pbs_count": int(circuit.programmable_bootstrap_count),
            "max_bit_width": int(circuit.graph.maximum_integer_bit_width()),
            "complexity": float(circuit.complexity),
            "p_error": float(circuit.p_error),
            "global_p_error": float(circuit.global_p_error),
        }


def _tracing_ready_in_this_thread() -> None:
    """Give this thread Concrete's tag stack: concrete-python 2.11 creates it in the thread that
    imports Concrete only, so tracing in any other thread (a web server's worker, a thread
    pool) fails with "'_thread._local' object has no attribute 'stack'"."""
    from concrete.fhe.extensions.tag import tag_context

    if not hasattr(tag_context, "stack"):
        tag_context.stack = []


def _free_bytes(folder: str) -> int:
    """Free bytes on the file system of `folder` (or of its nearest existing parent)."""
    path = Path(folder).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _traceable(program: IntegerProgram, count: int) -> Callable[..., Any]:
    """`program` as a function of named arguments x0..x{count-1}, as `fhe.Compiler` traces it."""

    def circuit_function(**kwargs):
        return program(*[kwargs[f"x{i}"] for i in range(count)])

    circuit_function.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(f"x{i}", inspect.Parameter.POSITIONAL_OR_KEYWORD) for i in range(count)]
    )
    return circuit_function
