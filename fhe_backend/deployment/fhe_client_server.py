"""Deploy one FHE partition: developer artifacts, a client that holds the keys, a server.

``FHEModelDev(path_dir, model).save()`` writes two files:

* ``client.zip``: Concrete's client specification (``client.specs.json``), the quantizers that
  turn floats into the circuit's integers and back (``serialized_processing.json``) and the
  package versions (``versions.json``);
* ``server.zip``: Concrete's own server archive (``circuit.server.save``), plus
  ``versions.json`` and ``server_info.json`` (input shapes). It holds no key.

``FHEModelClient`` generates the private and evaluation keys, quantizes, encrypts and
serializes inputs, and decrypts/dequantizes results. ``FHEModelServer`` runs the circuit on
serialized ciphertexts with serialized evaluation keys. Everything on the wire is Concrete's
own serialization (``fhe.Value``, ``fhe.EvaluationKeys``) or JSON: nothing is unpickled.

A circuit runs one sample (`FhePartition.rows_per_sample` rows of the batch-major dim 0): a
single sample is serialized as ``bytes``, a batch as a list with one item per sample.
"""

from __future__ import annotations

import enum
import hashlib
import json
import platform
import secrets
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from concrete import fhe

from ..circuit_runner import portable_server
from ..errors import FheBackendError
from ..exit_status import keep_python_sigpipe
from ..graph_utils import as_tuple, output_nodes
from ..output_dirs import remove_with_server
from ..quantization.quantizers import OutputDequantizer, UniformQuantizer

CLIENT_ZIP = "client.zip"
SERVER_ZIP = "server.zip"
CLIENT_SPECS = "client.specs.json"
PROCESSING = "serialized_processing.json"
VERSIONS = "versions.json"
SERVER_INFO = "server_info.json"

# one sample of a circuit with one input/output is bytes; several inputs/outputs: a tuple
SerializedSample = Union[bytes, Tuple[bytes, ...]]
Serialized = Union[SerializedSample, List[SerializedSample]]


class DeploymentError(FheBackendError):
    """A deployment artifact is missing, malformed, or cannot serve the request."""


class VersionMismatchError(DeploymentError):
    """Artifacts were saved with package versions other than the running ones."""


class ArtifactsNotFoundError(DeploymentError, AssertionError):
    """`FHEModelClient` / `FHEModelServer` on a folder without the saved artifacts (Concrete ML
    asserts that the folder exists: an AssertionError)."""


class DeploymentModeError(DeploymentError, ValueError):
    """`FHEModelDev.save` got an unknown mode, or one this project does not have (Concrete ML
    raises ValueError / AssertionError there)."""


class DeploymentMode(enum.Enum):
    """What `FHEModelDev.save` deploys (Concrete ML's names; only INFERENCE exists here)."""

    INFERENCE = "inference"
    TRAINING = "training"

    @staticmethod
    def is_valid(mode: Union["DeploymentMode", str]) -> bool:
        """Whether `mode` (a member or its value) names a deployment mode."""
        return getattr(mode, "value", mode) in {member.value for member in DeploymentMode}


def package_versions() -> Dict[str, str]:
    """The versions that must match between the saving and the loading side."""
    from importlib.metadata import version

    return {
        "fhe_backend": version("fhe-backend"),
        "concrete-python": version("concrete-python"),
        "python": ".".join(platform.python_version_tuple()[:2]),
    }


def check_versions(saved: Dict[str, str], where: Union[str, Path]) -> None:
    """Raise `VersionMismatchError` naming every package whose version differs."""
    current = package_versions()
    wrong = {name: (saved.get(name), current[name]) for name in current if saved.get(name) != current[name]}
    if wrong:
        details = ", ".join(f"{name}: saved {old!r}, running {new!r}" for name, (old, new) in wrong.items())
        raise VersionMismatchError(
            f"{where} was saved with other package versions ({details}); install the saved "
            "versions or save the artifacts again with the running ones"
        )


@dataclass
class ProcessingSpec:
    """What the client needs around the circuit: quantizers, sample layout, output dtypes."""

    input_quantizers: List[UniformQuantizer]
    output_dequantizers: List[OutputDequantizer]
    rows_per_sample: List[int]
    input_shapes: List[Tuple[int, ...]]
    output_dtypes: List[str] = field(default_factory=list)
    module_path: str = ""

    @classmethod
    def from_partition(cls, partition: Any) -> "ProcessingSpec":
        """The spec of a compiled `FhePartition`."""
        program = partition.program
        dtypes = []
        for node in output_nodes(partition.graph_module):
            meta = node.meta.get("val")
            dtypes.append(
                str(meta.dtype).replace("torch.", "") if isinstance(meta, torch.Tensor) else "float32"
            )
        return cls(
            list(program.input_quantizers),
            list(program.output_dequantizers),
            list(partition.rows_per_sample),
            [tuple(s) for s in partition.statistics["input_shape"]],
            dtypes,
            partition.module_path,
        )

    def to_json(self) -> str:
        """JSON text (no pickle)."""
        return json.dumps(
            {
                "input_quantizers": [q.to_dict() for q in self.input_quantizers],
                "output_dequantizers": [d.to_dict() for d in self.output_dequantizers],
                "rows_per_sample": self.rows_per_sample,
                "input_shapes": [list(s) for s in self.input_shapes],
                "output_dtypes": self.output_dtypes,
                "module_path": self.module_path,
            }
        )

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "ProcessingSpec":
        """Inverse of `to_json`."""
        data = json.loads(text)
        return cls(
            [UniformQuantizer.from_dict(q) for q in data["input_quantizers"]],
            [OutputDequantizer.from_dict(d) for d in data["output_dequantizers"]],
            [int(r) for r in data["rows_per_sample"]],
            [tuple(int(d) for d in s) for s in data["input_shapes"]],
            list(data.get("output_dtypes", [])),
            data.get("module_path", ""),
        )

    def split_samples(self, q_inputs: Sequence[np.ndarray]) -> List[Tuple[np.ndarray, ...]]:
        """Batch-major integer inputs -> one tuple of arrays per sample."""
        rows = self.rows_per_sample
        total = q_inputs[0].shape[0]
        if total % rows[0]:
            raise DeploymentError(
                f"the input has {total} rows, not a multiple of the {rows[0]} "
                f"rows of one sample (sample shape {self.input_shapes[0]})"
            )
        return [
            tuple(q[i * r : (i + 1) * r] for q, r in zip(q_inputs, rows)) for i in range(total // rows[0])
        ]

    def to_torch(self, outputs: Sequence[np.ndarray]) -> Tuple[torch.Tensor, ...]:
        """Dequantized float arrays -> tensors of the recorded output dtypes."""
        tensors = []
        for index, value in enumerate(outputs):
            dtype = (
                getattr(torch, self.output_dtypes[index])
                if index < len(self.output_dtypes)
                else torch.float32
            )
            tensor = torch.from_numpy(np.asarray(value))
            tensors.append(tensor.to(dtype) if dtype.is_floating_point else tensor.round().to(dtype))
        return tuple(tensors)


def partition_of(model: Any):
    """The one `FhePartition` to deploy: the partition itself, or the only one of a model."""
    from ..backend import partitions
    from ..runtime import FhePartition

    if isinstance(model, FhePartition):
        return model
    for attribute in ("fhe_partition", "partition"):
        candidate = getattr(model, attribute, None)
        if isinstance(candidate, FhePartition):
            return candidate
    found = partitions(model)
    if len(found) != 1:
        raise DeploymentError(
            f"FHEModelDev needs one FHE partition; {type(model).__name__} has {len(found)}. Pass "
            "an FhePartition (fhe_backend.partitions(compiled_model)[i]) or a model compiled to "
            "exactly one partition"
        )
    return found[0]


class FHEModelDev:
    """Save the client and server artifacts of one compiled FHE partition."""

    def __init__(self, path_dir: Union[str, Path], model: Any = None):
        """`path_dir`: the folder to save into (created now, as in Concrete ML)."""
        self.path_dir = Path(path_dir)
        self.model = model
        self.path_dir.mkdir(parents=True, exist_ok=True)

    def save(
        self, mode: Union[DeploymentMode, str, None] = DeploymentMode.INFERENCE, via_mlir: bool = True
    ) -> None:
        """Write client.zip and server.zip into `path_dir`, which must be empty.

        mode: Concrete ML's `DeploymentMode` or its name in any case (None: inference); only
        inference exists here (Concrete ML's "training" mode saves the training circuit of its
        built-in SGD models, which this project does not have: it raises). via_mlir (default
        True, as in Concrete ML): save the circuit as MLIR, recompiled when the server loads
        it (portable across machines).
        """
        mode_name = "inference" if mode is None else str(getattr(mode, "value", mode)).lower()
        if not DeploymentMode.is_valid(mode_name):
            raise DeploymentModeError(
                f"FHEModelDev.save(mode={mode!r}): Mode must be either 'inference' or 'training'"
            )
        if DeploymentMode(mode_name) is DeploymentMode.TRAINING:
            raise DeploymentModeError(
                "FHEModelDev.save(mode='training'): Training FHE circuit does not "
                "exist: fhe_backend deploys inference circuits (LoRA training "
                "runs through HybridFHEModel / LoraTrainer instead)"
            )
        check_compiled = getattr(self.model, "check_model_is_compiled", None)
        if check_compiled is not None:  # a QuantizedModule says so in Concrete ML's words
            check_compiled()
        partition = partition_of(self.model)
        partition._require_compiled()
        self.path_dir.mkdir(parents=True, exist_ok=True)
        if any(self.path_dir.iterdir()):
            raise DeploymentError(
                f"path_dir: {self.path_dir} is not empty. Please delete it before saving a new "
                "model (or choose an empty folder)."
            )
        circuit = partition.circuit
        circuit.enable_fhe_execution()
        processing = ProcessingSpec.from_partition(partition)
        versions = json.dumps(package_versions())
        portable_server(circuit).save(self.path_dir / SERVER_ZIP, via_mlir=via_mlir)
        server_info = {
            "input_shapes": [list(s) for s in processing.input_shapes],
            "module_path": processing.module_path,
        }
        _append_to_zip(self.path_dir / SERVER_ZIP, {VERSIONS: versions, SERVER_INFO: json.dumps(server_info)})
        with zipfile.ZipFile(self.path_dir / CLIENT_ZIP, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(CLIENT_SPECS, circuit.client.specs.serialize())
            archive.writestr(PROCESSING, processing.to_json())
            archive.writestr(VERSIONS, versions)


def _append_to_zip(path: Path, members: Dict[str, str]) -> None:
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as archive:
        for name, text in members.items():
            archive.writestr(name, text)


def _read_zip(path: Path, names: Sequence[str]) -> Dict[str, bytes]:
    if not path.parent.is_dir():
        raise ArtifactsNotFoundError(
            f"{path.parent} does not exist. Please specify a valid path: the folder that "
            "FHEModelDev(...).save() wrote"
        )
    if not path.is_file():
        raise ArtifactsNotFoundError(
            f"{path} not found: save the artifacts with FHEModelDev(...).save() first"
        )
    with zipfile.ZipFile(path) as archive:
        missing = [n for n in names if n not in archive.namelist()]
        if missing:
            raise DeploymentError(f"{path} lacks {missing}: it was not written by FHEModelDev")
        return {name: archive.read(name) for name in names}


class FHEModelClient:
    """The client side: keys, quantize + encrypt + serialize, deserialize + decrypt + dequantize."""

    def __init__(self, path_dir: Union[str, Path], key_dir: Optional[Union[str, Path]] = None):
        self.path_dir = Path(path_dir)
        self.key_dir = Path(key_dir) if key_dir is not None else None
        self.load()

    def load(self) -> None:
        """(Re)load client.zip: Concrete's client specs and the quantizers."""
        files = _read_zip(self.path_dir / CLIENT_ZIP, [CLIENT_SPECS, PROCESSING, VERSIONS])
        check_versions(json.loads(files[VERSIONS]), self.path_dir / CLIENT_ZIP)
        self.specs_bytes = files[CLIENT_SPECS]
        self.processing = ProcessingSpec.from_json(files[PROCESSING])
        self.client = fhe.Client(fhe.ClientSpecs.deserialize(self.specs_bytes))

    @property
    def keys_path(self) -> Optional[Path]:
        """Where the private keys of this circuit are kept (None: in memory only)."""
        if self.key_dir is None:
            return None
        digest = hashlib.sha256(self.specs_bytes).hexdigest()[:16]
        return self.key_dir / f"{digest}.keys"

    def generate_private_and_evaluation_keys(self, force: bool = False) -> None:
        """Generate fresh random keys (or load them from `key_dir`); `force` regenerates."""
        path = self.keys_path
        if not force and self.client.keys.are_generated:
            return
        if path is not None and path.exists() and not force:
            self.client.keys.load(path)
            return
        self.client.keys.generate(
            force=True, secret_seed=secrets.randbits(128), encryption_seed=secrets.randbits(128)
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            temporary.unlink(missing_ok=True)
            self.client.keys.save(temporary)
            temporary.replace(path)

    def get_serialized_evaluation_keys(self, include_tfhers_key: bool = False) -> bytes:
        """The public evaluation keys to send to the server (generated on first use).

        include_tfhers_key: Concrete ML adds a TFHE-rs public key for models whose ciphertexts
        are in TFHE-rs format; circuits here use Concrete's format only, so, as in Concrete ML
        for such models, only the evaluation keys are returned.
        """
        self.generate_private_and_evaluation_keys()
        return self.client.evaluation_keys.serialize()

    def quantize_encrypt_serialize(self, *x: Any) -> Serialized:
        """Float inputs -> bytes for one sample, or a list of per-sample bytes for a batch.

        A model with several inputs takes them as arguments, as in Concrete ML
        (``quantize_encrypt_serialize(a, b)``), or as one tuple; one sample of several inputs
        serializes to a tuple of bytes.
        """
        inputs = as_tuple(x[0]) if len(x) == 1 else x
        quantizers = self.processing.input_quantizers
        if len(inputs) != len(quantizers):
            raise DeploymentError(
                f"quantize_encrypt_serialize got {len(inputs)} input(s); the circuit has "
                f"{len(quantizers)}: pass one array per model input"
            )
        q_inputs = tuple(q.quantize(_numpy(v)) for q, v in zip(quantizers, inputs))
        return self.encrypt_serialize_integers(q_inputs)

    def encrypt_serialize_integers(self, q_inputs: Sequence[np.ndarray]) -> Serialized:
        """Batch-major integer inputs -> serialized ciphertexts (see `quantize_encrypt_serialize`)."""
        self.generate_private_and_evaluation_keys()
        items = []
        for sample in self.processing.split_samples(q_inputs):
            encrypted = self.client.encrypt(*sample)
            values = as_tuple(encrypted)
            serialized = tuple(v.serialize() for v in values)
            items.append(serialized[0] if len(serialized) == 1 else serialized)
        return items[0] if len(items) == 1 else items

    def deserialize_decrypt(self, *y: Serialized) -> Union[np.ndarray, Tuple[np.ndarray, ...]]:
        """Serialized result(s) -> integer array(s), samples concatenated along dim 0.

        One sample's outputs come as arguments, as in Concrete ML
        (``deserialize_decrypt(*server_result)``), or as the server's result itself (bytes, a
        tuple of bytes, or a list of them for a batch).
        """
        result = y[0] if len(y) == 1 else tuple(y)
        items = result if isinstance(result, list) else [result]
        per_sample = []
        for item in items:
            values = as_tuple(item)
            decrypted = self.client.decrypt(*[fhe.Value.deserialize(v) for v in values])
            per_sample.append(as_tuple(decrypted))
        dequantizers = self.processing.output_dequantizers
        if len(per_sample[0]) != len(dequantizers):
            raise DeploymentError(
                f"the result holds {len(per_sample[0])} output(s) per sample, the client's "
                f"specs ({self.path_dir / CLIENT_ZIP}) {len(dequantizers)}: is it the server of "
                "another model?"
            )
        outputs = tuple(
            dequantizer.decrypted(np.concatenate([np.asarray(p[i]) for p in per_sample]))
            for i, dequantizer in enumerate(dequantizers)
        )
        return outputs[0] if len(outputs) == 1 else outputs

    def deserialize_decrypt_dequantize(self, *y: Serialized) -> Union[np.ndarray, Tuple[np.ndarray, ...]]:
        """Serialized result(s) -> float array(s) (arguments as in `deserialize_decrypt`)."""
        decrypted = self.deserialize_decrypt(*y)
        outputs = as_tuple(decrypted)
        floats = tuple(d.dequantize(o) for d, o in zip(self.processing.output_dequantizers, outputs))
        return floats[0] if len(floats) == 1 else floats


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def read_server_info(path_dir: Union[str, Path]) -> Tuple[List[Tuple[int, ...]], bytes]:
    """The input shapes and client specification (JSON bytes) in a module folder's server.zip,
    read without loading its circuit (which compiles an MLIR archive); checks its versions."""
    archive = Path(path_dir) / SERVER_ZIP
    files = _read_zip(archive, [VERSIONS, SERVER_INFO, CLIENT_SPECS])
    check_versions(json.loads(files[VERSIONS]), archive)
    info = json.loads(files[SERVER_INFO])
    return [tuple(shape) for shape in info["input_shapes"]], files[CLIENT_SPECS]


class FHEModelServer:
    """The server side: runs the circuit on serialized ciphertexts; holds no private key."""

    def __init__(self, path_dir: Union[str, Path]):
        self.path_dir = Path(path_dir)
        self.load()

    def load(self) -> None:
        """(Re)load server.zip: the circuit, its input shapes and client specs."""
        self.input_shapes, self.specs_bytes = read_server_info(self.path_dir)
        self.server = remove_with_server(fhe.Server.load(self.path_dir / SERVER_ZIP))

    def expected_evaluation_key_bytes(self) -> Optional[int]:
        """Byte size of this circuit's serialized key payloads (None when keys are compressed)."""
        return evaluation_key_payload_bytes(json.loads(self.specs_bytes))

    def run(
        self,
        serialized_encrypted_input: Serialized,
        serialized_evaluation_keys: Union[bytes, fhe.EvaluationKeys],
    ) -> Serialized:
        """Run the circuit on each sample; returns the same layout: bytes (a tuple of them for
        several inputs or outputs) or a list of those for a batch. Inputs given as `fhe.Value`
        (not serialized) give `fhe.Value` outputs, as in Concrete ML."""
        from .wire import WireFormatError, check_evaluation_keys

        keys = serialized_evaluation_keys
        if not isinstance(keys, fhe.EvaluationKeys):
            try:  # parameters other than the circuit's abort the process inside Concrete
                check_evaluation_keys(keys, json.loads(self.specs_bytes))
            except WireFormatError as error:
                raise DeploymentError(str(error)) from None
            keys = fhe.EvaluationKeys.deserialize(keys)
        items = serialized_encrypted_input
        results = [self._run_sample(item, keys) for item in (items if isinstance(items, list) else [items])]
        keep_python_sigpipe()  # Concrete's runtime, now started, may have taken SIGPIPE
        return results if isinstance(items, list) else results[0]

    def _run_sample(self, item: Any, keys: fhe.EvaluationKeys) -> Any:
        values = as_tuple(item)
        serialized = [isinstance(v, bytes) for v in values]
        if not all(serialized) and (any(serialized) or not all(isinstance(v, fhe.Value) for v in values)):
            raise DeploymentError(
                f"{self.path_dir}: inputs must all be serialized ciphertexts (bytes) or all "
                f"concrete.fhe.Value, got {[type(v).__name__ for v in values]}"
            )
        if all(serialized):
            values = tuple(self._checked_value(v, i) for i, v in enumerate(values))
        result = self.server.run(*values, evaluation_keys=keys)
        outputs = tuple(r.serialize() if all(serialized) else r for r in as_tuple(result))
        return outputs[0] if len(outputs) == 1 else outputs

    def _checked_value(self, data: bytes, position: int) -> fhe.Value:
        """A serialized ciphertext checked against circuit input `position`, then deserialized."""
        from .wire import WireFormatError, check_ciphertext

        try:
            check_ciphertext(
                data, json.loads(self.specs_bytes)["circuits"][0]["inputs"][position], f"input {position}"
            )
        except (WireFormatError, IndexError) as error:
            raise DeploymentError(f"{self.path_dir}: {error}") from None
        return fhe.Value.deserialize(data)


def evaluation_key_payload_bytes(specs: Dict[str, Any]) -> Optional[int]:
    """Bytes of the uncompressed key payloads a keyset of these client specs serializes to.

    Used to reject evaluation keys made for another circuit before running: keys whose
    parameters differ from the circuit's abort the process inside Concrete.
    """
    from .wire import evaluation_key_bytes

    return evaluation_key_bytes(specs)
