"""Hybrid FHE models: chosen submodules run in FHE on a server, the rest on the client.

`HybridFHEModel` replaces each named submodule by a `RemoteModule`. `compile_model` records
the activations reaching each of them and compiles the submodule with the ``fhe`` backend: a
remote module IS one FHE partition of the backend. Its modes are the partition's modes
(disable, simulate, execute, and remote, where the partition's integer inputs are encrypted,
sent to the server and the results decrypted) plus torch and calibrate.

`save_and_clear_private_info` writes each module's client/server artifacts (`FHEModelDev`)
under ``<path>/<module>/<input shape>/`` and the client-side model, without the remote weights,
to ``<path>/model.pth``. ``fhe-backend serve`` serves the folder; `init_client` downloads the
client specs, generates keys and uploads the evaluation keys.
"""

from __future__ import annotations

import enum
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .conv1d import convert_conv1d_to_linear, is_conv1d
from .deployment.fhe_client_server import (
    CLIENT_ZIP,
    SERVER_ZIP,
    DeploymentError,
    FHEModelClient,
    FHEModelDev,
    package_versions,
)
from .errors import NotCompiledError, OptionError
from .graph_utils import as_tuple
from .output_dirs import remove_with

__all__ = [
    "HybridFHEMode",
    "HybridFHEModel",
    "RemoteModule",
    "convert_conv1d_to_linear",
    "tuple_to_underscore_str",
    "underscore_str_to_tuple",
]

MODEL_FILE = "model.pth"
HUB_FOLDER = "hub"


class HybridFHEMode(enum.Enum):
    """How a remote module runs: the backend's FHE modes plus remote, torch and calibrate."""

    DISABLE = "disable"  # the quantized integer program, in the clear
    REMOTE = "remote"  # encrypted on the client, computed by the FHE server
    SIMULATE = "simulate"  # Concrete's simulation of the circuit
    CALIBRATE = "calibrate"  # float module, recording its inputs for compilation
    EXECUTE = "execute"  # real encryption, locally
    TORCH = "torch"  # the float module

    @classmethod
    def parse(cls, value: Any) -> "HybridFHEMode":
        """An enum member from a member or its (case-insensitive) name or value."""
        if isinstance(value, cls):
            return value
        text = str(getattr(value, "value", value)).lower()
        for member in cls:
            if text in (member.value, member.name.lower()):
                return member
        raise OptionError(f"hybrid FHE mode {value!r}: allowed modes are {[m.value for m in cls]}")


def tuple_to_underscore_str(tup: Tuple) -> str:
    """A shape (tuples may nest) as a file and URL name: (1, 8) -> 'po_1_8_pc',
    (1, (2, 3)) -> 'po_1_po_2_3_pc_pc'."""
    parts = [tuple_to_underscore_str(item) if isinstance(item, tuple) else str(int(item)) for item in tup]
    return "_".join(["po", *parts, "pc"]) if parts else "po__pc"


def underscore_str_to_tuple(text: str) -> Tuple:
    """Inverse of `tuple_to_underscore_str`: 'po_1_8_pc' -> (1, 8); nested tuples included."""
    tokens = [token for token in str(text).split("_") if token]
    if not tokens or not all(t in ("po", "pc") or t.isdigit() for t in tokens):
        raise ValueError(f"{text!r} is not a shape string like 'po_1_8_pc' (tuple_to_underscore_str)")

    def parse(position: int) -> Tuple[Tuple, int]:
        items: List[Any] = []
        while position < len(tokens):
            token = tokens[position]
            if token == "pc":
                return tuple(items), position + 1
            if token == "po":
                item, position = parse(position + 1)
                items.append(item)
            else:
                items.append(int(token))
                position += 1
        raise ValueError(f"{text!r}: unbalanced 'po_' / '_pc' in a shape string")

    if tokens[0] != "po":
        raise ValueError(f"{text!r} is not a shape string like 'po_1_8_pc' (tuple_to_underscore_str)")
    result, end = parse(1)
    if end != len(tokens):
        raise ValueError(f"{text!r}: text after the closing '_pc' of a shape string")
    return result


def module_dir_name(module_name: str) -> str:
    """The folder/URL name of a remote module: 'seq.0' -> 'seq_0'."""
    return module_name.replace(".", "_")


class RemoteModule(nn.Module):
    """A submodule that runs in FHE: one partition of the ``fhe`` backend, local or remote."""

    def __init__(
        self,
        module: Optional[nn.Module] = None,
        server_remote_address: Optional[str] = None,
        module_name: Optional[str] = None,
        model_name: Optional[str] = None,
        verbose: int = 0,
    ):
        super().__init__()
        self.private_module = module
        self.server_remote_address = server_remote_address
        self.module_name = module_name
        self.model_name = model_name
        self.verbose = verbose
        self.fhe_local_mode = HybridFHEMode.TORCH if module is not None else HybridFHEMode.REMOTE
        self.calibration_data: List[torch.Tensor] = []
        self.input_shape: Optional[Tuple[int, ...]] = None
        self._runtime_state()

    def _runtime_state(self) -> None:
        """Attributes that never leave the process (compiled graph, keys, HTTP session)."""
        self.graph: Any = None  # fhe_backend.backend.CompiledGraph of the private module
        self.partition: Any = None  # its FhePartition
        self.private_q_module: Any = None  # the fhe_backend.compile.QuantizedModule around both
        self.clients: Dict[str, FHEModelClient] = {}  # per input-shape string
        self.key_ids: Dict[str, str] = {}
        self.http: Any = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in ("graph", "partition", "private_q_module", "clients", "key_ids", "http"):
            state.pop(name, None)
        state["calibration_data"] = []
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._runtime_state()

    # ---- modes --------------------------------------------------------------------------

    @property
    def fhe_local_mode(self) -> HybridFHEMode:
        """disable | remote | simulate | calibrate | execute | torch (strings accepted)."""
        return self._fhe_local_mode

    @fhe_local_mode.setter
    def fhe_local_mode(self, value: Any) -> None:
        self._fhe_local_mode = HybridFHEMode.parse(value)

    @property
    def url_name(self) -> str:
        """The module's name on the server ('.' replaced by '_')."""
        return module_dir_name(self.module_name or "module")

    # ---- compilation --------------------------------------------------------------------

    def compile(
        self,
        n_bits: Any = 8,
        rounding_threshold_bits: Any = None,
        p_error: Optional[float] = None,
        configuration: Any = None,
        device: str = "cpu",
        runner: str = "auto",
    ) -> None:
        """Compile the private module (one FHE partition of the backend) on the recorded activations.

        `runner` is how local `execute` runs a batch's samples (see `compile_torch_model`).
        """
        if not self.calibration_data:
            raise NotCompiledError(
                f"remote module '{self.module_name}' received no input during "
                "calibration: is it used by the model's forward?"
            )
        if self.private_module is None:
            raise DeploymentError(
                f"remote module '{self.module_name}' has no private module to compile "
                "(its private information was cleared)"
            )
        inputset = torch.cat(self.calibration_data)
        self.calibration_data = []
        module = _prepared(self.private_module)
        quantized = _compile_module(
            module,
            inputset,
            n_bits=n_bits,
            rounding_threshold_bits=rounding_threshold_bits,
            p_error=p_error,
            configuration=configuration,
            verbose=bool(self.verbose),
            device=device,
            runner=runner,
        )
        self.private_module = module
        self.private_q_module = quantized
        self.graph = quantized.graph
        self.partition = quantized.partition
        self.input_shape = tuple(self.partition.statistics["input_shape"][0])
        self.fhe_local_mode = HybridFHEMode.DISABLE

    # ---- client side --------------------------------------------------------------------

    def init_fhe_client(
        self, path_to_client: Optional[Path] = None, path_to_keys: Optional[Path] = None
    ) -> None:
        """Download the client specs of every input shape, generate keys, upload evaluation keys.

        path_to_client: where client.zip files go (default: a temporary folder);
        path_to_keys: where private keys are kept and reused (default: memory only).
        """
        from .deployment.http_client import FheHttpClient

        if not self.server_remote_address:
            raise DeploymentError(
                f"remote module '{self.module_name}': no server_remote_address; pass "
                "HybridFHEModel(..., server_remote_address='http://host:port')"
            )
        self.http = FheHttpClient(self.server_remote_address)
        if path_to_client:
            client_root = Path(path_to_client)
        else:  # removed with this module (or at exit)
            client_root = Path(tempfile.mkdtemp(prefix="fhe_client_"))
            remove_with(self, client_root)
        for shape in self.http.list_shapes(self.model_name, self.url_name):
            self.http.download_client(self.model_name, self.url_name, shape, client_root / shape)
            key_dir = Path(path_to_keys) / shape if path_to_keys else None
            client = FHEModelClient(client_root / shape, key_dir=key_dir)
            client.generate_private_and_evaluation_keys()
            self.key_ids[shape] = self.http.upload_evaluation_keys(
                self.model_name, self.url_name, shape, client.get_serialized_evaluation_keys()
            )
            self.clients[shape] = client
            self._log(f"client ready for shape {shape} (key id {self.key_ids[shape][:8]}...)")
        if self.partition is not None:
            self.partition.remote_runner = self.run_remote_integers

    def run_remote_integers(self, q_inputs: Sequence[np.ndarray]) -> Tuple[np.ndarray, ...]:
        """The partition's remote runner: integers -> encrypt -> ONE server request -> decrypt."""
        client, shape = self._client_for(q_inputs[0].shape)
        samples = client.encrypt_serialize_integers(q_inputs)
        samples = samples if isinstance(samples, list) else [samples]
        results = self.http.compute(self.model_name, self.url_name, shape, self.key_ids[shape], samples)
        decrypted = client.deserialize_decrypt(results)
        return as_tuple(decrypted)

    def remote_call(self, x: torch.Tensor) -> torch.Tensor:
        """Run the module on the FHE server: quantize, encrypt, send, decrypt, dequantize."""
        if self.partition is not None:
            return self._run_partition(x, HybridFHEMode.REMOTE)
        if not self.clients:
            raise DeploymentError(
                f"remote module '{self.module_name}': mode 'remote' needs the "
                "server's client specs and keys: call hybrid_model.init_client() "
                "first"
            )
        client, _ = self._client_for(tuple(x.shape))
        processing = client.processing
        q_inputs = tuple(q.quantize(x.detach().cpu().double().numpy()) for q in processing.input_quantizers)
        integers = self.run_remote_integers(q_inputs)
        outputs = processing.to_torch(
            [d.dequantize(o) for d, o in zip(processing.output_dequantizers, integers)]
        )
        return _single(tuple(o.to(x.device) for o in outputs))

    def _client_for(self, batch_shape: Tuple[int, ...]) -> Tuple[FHEModelClient, str]:
        """The client of the circuit for inputs of `batch_shape` (batch-major)."""
        if not self.clients:
            raise DeploymentError(f"remote module '{self.module_name}': call init_client() first")
        rows = next(iter(self.clients.values())).processing.rows_per_sample[0]
        shape = tuple_to_underscore_str((rows, *batch_shape[1:]))
        if shape not in self.clients:
            raise DeploymentError(
                f"remote module '{self.module_name}' has no circuit for input shape "
                f"{underscore_str_to_tuple(shape)}; compiled shapes: {sorted(self.clients)}"
            )
        return self.clients[shape], shape

    # ---- running ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run in `fhe_local_mode` (see `HybridFHEMode`).

        Every mode but torch and calibrate runs the compiled circuit (or the server): a module
        that was never compiled here raises instead of running its float weights. An input
        without the batch dim (one sample, e.g. ``torch.randn(dim)``) runs as a batch of one.
        """
        mode = self.fhe_local_mode
        if mode == HybridFHEMode.CALIBRATE:
            self.calibration_data.append(x.detach())
            return self._private(x)
        if mode == HybridFHEMode.TORCH:
            return self._private(x)
        if mode != HybridFHEMode.REMOTE and self.partition is None:
            where = (
                "its weights were cleared: use mode 'remote' after init_client()"
                if self.private_module is None
                else "call HybridFHEModel.compile_model(x) first, or use mode 'torch' for the float module"
            )
            raise NotCompiledError(
                f"remote module '{self.module_name}' is not compiled here, so mode "
                f"'{mode.value}' cannot run its FHE circuit: {where}"
            )
        single = self._is_single_sample(x)
        if single:
            x = x.unsqueeze(0)
        y = self.remote_call(x) if mode == HybridFHEMode.REMOTE else self._run_partition(x, mode)
        return _unbatched(y) if single else y

    def _is_single_sample(self, x: torch.Tensor) -> bool:
        """True when `x` lacks the batch dim of the circuit's input (one fewer dim)."""
        if self.input_shape is not None:
            dims = len(self.input_shape)
        elif self.clients:
            dims = len(next(iter(self.clients.values())).processing.input_shapes[0])
        else:
            return False
        return x.dim() == dims - 1

    def _private(self, x: torch.Tensor) -> torch.Tensor:
        if self.private_module is None:
            raise DeploymentError(
                f"remote module '{self.module_name}' has no private weights here "
                "(cleared by save_and_clear_private_info): use mode 'remote'"
            )
        return self.private_module(x)

    def _run_partition(self, x: torch.Tensor, mode: HybridFHEMode) -> torch.Tensor:
        if mode == HybridFHEMode.REMOTE and self.partition.remote_runner is None:
            raise DeploymentError(
                f"remote module '{self.module_name}': call init_client() before mode 'remote'"
            )
        self.partition.mode = mode.value
        with torch.no_grad():  # symbolic sizes (dynamo's dynamic shapes) are solved from x
            outputs = self.graph(*self.graph._bind((x,)))
        return _single(outputs)

    # ---- saving -------------------------------------------------------------------------

    def save_artifacts(self, path: Path, via_mlir: bool = True) -> Path:
        """Write client.zip/server.zip to ``path/<input shape>/``; returns that folder."""
        if self.partition is None:
            raise NotCompiledError(
                f"remote module '{self.module_name}' is not compiled: call compile_model first"
            )
        if len(self.graph.partitions) > 1 or self.graph.left_in_torch:
            raise DeploymentError(
                f"remote module '{self.module_name}' must compile to ONE FHE partition to be served, "
                f"it has {len(self.graph.partitions)} and leaves {[str(n) for n in self.graph.left_in_torch]} "
                "in torch: choose a smaller module, or one whose operations are all supported"
            )
        target = Path(path) / tuple_to_underscore_str(self.input_shape)
        FHEModelDev(target, self.partition).save(via_mlir=via_mlir)
        return target

    def clear_private_info(self) -> None:
        """Drop the float weights, the compiled graph and calibration data."""
        self.private_module = None
        self.graph = None
        self.partition = None
        self.calibration_data = []
        if self.fhe_local_mode != HybridFHEMode.REMOTE:
            self.fhe_local_mode = HybridFHEMode.REMOTE

    def _log(self, message: str) -> None:
        if self.verbose:
            print(f"[fhe_backend] {self.module_name}: {message}")

    def extra_repr(self) -> str:
        """The module name and mode, shown by print(model)."""
        return f"module_name={self.module_name!r}, mode={self.fhe_local_mode.value!r}"


def _unbatched(outputs: Any) -> Any:
    """Drop the batch dim added to a single sample (from every output)."""
    if isinstance(outputs, tuple):
        return tuple(o.squeeze(0) for o in outputs)
    return outputs.squeeze(0)


def _compile_module(module: nn.Module, inputset: torch.Tensor, n_bits: Any, **options: Any):
    """Compile a whole module into one FHE partition with the Concrete-ML-style API.

    Brevitas modules are compiled as QAT (their own quantizers), others at `n_bits`; every
    operation must run in FHE (the server runs the whole module).
    """
    from .compile import compile_brevitas_qat_model, compile_torch_model
    from .qat import has_any_qnn_layers

    if has_any_qnn_layers(module):
        return compile_brevitas_qat_model(module, inputset, **options)
    return compile_torch_model(module, inputset, n_bits=n_bits, **options)


def _prepared(module: nn.Module) -> nn.Module:
    """GPT-2 ``Conv1D`` layers become ``nn.Linear`` (the same function, a standard layer)."""
    if any(is_conv1d(m) for m in module.modules()):
        module = convert_conv1d_to_linear(module)
    return module.eval()


def _single(outputs: Any) -> Any:
    if isinstance(outputs, (tuple, list)) and len(outputs) == 1:
        return outputs[0]
    return tuple(outputs) if isinstance(outputs, list) else outputs


class HybridFHEModel:
    """Convert a model to a hybrid model (in place): named submodules become `RemoteModule`s.

    model: the torch model; module_names: a name or list of names from ``model.named_modules()``
    ('.' or '_' separators); server_remote_address: URL of ``fhe-backend serve``;
    model_name: the model's name on the server; verbose: print client/server interactions.
    """

    def __init__(
        self,
        model: nn.Module,
        module_names: Union[str, List[str]],
        server_remote_address: Optional[str] = None,
        model_name: str = "model",
        verbose: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"The model must be a PyTorch or Brevitas model: HybridFHEModel needs an "
                f"nn.Module, got {type(model).__name__}"
            )
        if isinstance(module_names, str):
            module_names = [module_names]
        if not isinstance(module_names, (list, tuple)) or not all(isinstance(n, str) for n in module_names):
            raise TypeError(f"module_names = {module_names!r}: expected a name or a list of names")
        self.model = model
        self.server_remote_address = server_remote_address
        self.model_name = model_name
        self.verbose = verbose
        self.module_names = [resolve_module_name(model, name) for name in module_names]
        self.remote_modules: Dict[str, RemoteModule] = {}
        self.saved_path: Optional[Path] = None
        self.configuration: Any = None
        for name in self.module_names:
            self.remote_modules[name] = self._wrap(name)

    @property
    def private_modules(self) -> Dict[str, Optional[nn.Module]]:
        """The float module of each remote module (None once cleared), by name."""
        return {name: remote.private_module for name, remote in self.remote_modules.items()}

    @property
    def private_q_modules(self) -> Dict[str, Any]:
        """The compiled `QuantizedModule` of each remote module, by name (after compile_model)."""
        return {
            name: remote.private_q_module
            for name, remote in self.remote_modules.items()
            if remote.private_q_module is not None
        }

    def _wrap(self, name: str) -> RemoteModule:
        parent_name, _, attribute = name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        current = getattr(parent, attribute)
        if isinstance(current, RemoteModule):  # a client-side model saved by save_and_clear_private_info
            current.server_remote_address = self.server_remote_address or current.server_remote_address
            current.model_name, current.verbose = self.model_name, self.verbose
            return current
        remote = RemoteModule(current, self.server_remote_address, name, self.model_name, self.verbose)
        setattr(parent, attribute, remote)
        return remote

    # ---- compile and run ----------------------------------------------------------------

    def compile_model(
        self,
        x: Any,
        n_bits: Any = 8,
        rounding_threshold_bits: Any = None,
        p_error: Optional[float] = None,
        device: str = "cpu",
        configuration: Any = None,
        use_dynamic_quantization: bool = False,
        runner: str = "auto",
    ) -> None:
        """Run the model once on `x` (calibration) and compile every remote module to FHE.

        Arguments follow Concrete ML's. `device` is 'cpu' or 'cuda' (GPU build of
        concrete-python). `runner` (not in Concrete ML) is how local `fhe="execute"` runs a
        batch's samples: "auto"/"threads", "local" or "ray". `use_dynamic_quantization=True` needs Concrete ML's GLWE linear-layer
        backend, which does not exist here: it raises, as Concrete ML does without that backend.
        """
        if use_dynamic_quantization:
            raise OptionError(
                "use_dynamic_quantization=True: Dynamic quantization requires GLWE "
                "backend (Concrete ML's concrete-ml-extensions), which fhe_backend "
                "does not have; remote layers use static quantization calibrated on "
                "x: pass use_dynamic_quantization=False"
            )
        self.configuration = configuration
        self.set_fhe_mode(HybridFHEMode.CALIBRATE)
        try:
            with torch.no_grad():
                _call(self.model.eval(), x)
        except Exception:
            self.set_fhe_mode(HybridFHEMode.TORCH)
            raise
        for remote in self.remote_modules.values():
            remote.compile(n_bits, rounding_threshold_bits, p_error, configuration, device, runner)

    def forward(self, x: Any, fhe: Union[None, str, HybridFHEMode] = None) -> Any:
        """Run the model; with `fhe` given, every remote module runs in that mode first.

        Without `fhe` each remote module keeps its own `fhe_local_mode` (after compile_model:
        'disable'; after save_and_clear_private_info, or set by hand as in the deployment
        guide: 'remote').
        """
        if fhe is not None:
            self.set_fhe_mode(fhe)
        with torch.no_grad():
            return _call(self.model, x)

    __call__ = forward

    def set_fhe_mode(self, hybrid_fhe_mode: Union[str, HybridFHEMode]) -> None:
        """Set the mode of every remote module."""
        mode = HybridFHEMode.parse(hybrid_fhe_mode)
        for remote in self.remote_modules.values():
            remote.fhe_local_mode = mode

    def init_client(
        self, path_to_clients: Optional[Path] = None, path_to_keys: Optional[Path] = None
    ) -> None:
        """Set up the FHE client of every remote module (client specs, keys, key upload)."""
        for name, remote in self.remote_modules.items():
            folder = module_dir_name(name)
            remote.init_fhe_client(
                Path(path_to_clients) / folder if path_to_clients else None,
                Path(path_to_keys) / folder if path_to_keys else None,
            )

    # ---- save, clear, publish -----------------------------------------------------------

    def save_and_clear_private_info(self, path: Union[str, Path], via_mlir: bool = True) -> None:
        """Save the server artifacts of each remote module and the client model without them.

        Writes ``path/<module>/<input shape>/{client.zip, server.zip}`` (serve `path`'s parent
        folder, named after `model_name`) and ``path/model.pth``: the model, whose remote
        modules hold no weights (load it with ``torch.load(..., weights_only=False)``).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, remote in self.remote_modules.items():
            remote.save_artifacts(path / module_dir_name(name), via_mlir=via_mlir)
        for remote in self.remote_modules.values():
            remote.clear_private_info()
        torch.save(self.model, path / MODEL_FILE)
        self.saved_path = path

    def publish_to_hub(
        self,
        repo_id: Optional[str] = None,
        path: Optional[Union[str, Path]] = None,
        token: Optional[str] = None,
        private: bool = True,
    ) -> Path:
        """Package the saved server artifacts as a model-hub folder and upload it.

        The folder (``<path>/hub``) has a README model card, ``model_info.json`` and
        ``<module>/<input shape>/{client,server}.zip``. Uploading needs `repo_id` (e.g.
        "user/my-hybrid-model"), a token (argument or `huggingface-cli login`) and network;
        otherwise `DeploymentError` says what is missing. Returns the folder.
        """
        source = Path(path) if path is not None else self.saved_path
        if source is None:
            raise DeploymentError(
                "publish_to_hub: nothing saved yet; call save_and_clear_private_info(path) "
                "first or pass path=<its folder>"
            )
        folder = package_for_hub(source, self.model_name, self.module_names)
        if not repo_id:
            raise DeploymentError(
                f"publish_to_hub: no repo_id given; the package is ready in {folder}; pass "
                "repo_id='user/name' (and a token) to upload it to the Hugging Face Hub"
            )
        try:
            from huggingface_hub import HfApi
        except ImportError as error:
            raise DeploymentError(
                "publish_to_hub needs huggingface_hub: pip install huggingface_hub"
            ) from error
        try:
            api = HfApi(token=token)
            api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=str(folder))
        except Exception as error:  # network, authentication and hub errors all end here
            raise DeploymentError(
                f"publish_to_hub: uploading {folder} to '{repo_id}' failed "
                f"({type(error).__name__}: {error}); check the network, the token and "
                "the repo id; the package stays in that folder"
            ) from error
        return folder


def package_for_hub(source: Path, model_name: str, module_names: Sequence[str]) -> Path:
    """Copy the server artifacts of a saved hybrid model into ``source/hub`` with a model card."""
    folder = source / HUB_FOLDER
    if folder.exists():
        shutil.rmtree(folder)
    modules: Dict[str, List[str]] = {}
    for artifact in sorted(source.glob(f"*/*/{SERVER_ZIP}")):
        shape_dir = artifact.parent
        if shape_dir.parent.parent != source:
            continue
        target = folder / shape_dir.parent.name / shape_dir.name
        target.mkdir(parents=True)
        for name in (SERVER_ZIP, CLIENT_ZIP):
            shutil.copyfile(shape_dir / name, target / name)
        modules.setdefault(shape_dir.parent.name, []).append(shape_dir.name)
    if not modules:
        raise DeploymentError(f"publish_to_hub: {source} holds no saved module (<module>/<shape>/server.zip)")
    info = {
        "model_name": model_name,
        "module_names": list(module_names),
        "modules": modules,
        "versions": package_versions(),
    }
    (folder / "model_info.json").write_text(json.dumps(info, indent=2))
    (folder / "README.md").write_text(
        f"---\nlibrary_name: fhe_backend\ntags:\n- fhe\n- hybrid-model\n---\n\n# {model_name}: FHE server artifacts\n\n"
        f"Remote modules: {', '.join(sorted(modules))}. Serve with "
        f"`fhe-backend serve MODELS_DIR --keys-dir KEYS` after placing this folder at `MODELS_DIR/{model_name}`.\n"
        "The archives hold circuits and quantizers only: no weights in the clear, no private key.\n"
    )
    return folder


def resolve_module_name(model: nn.Module, name: str) -> str:
    """The `named_modules()` name meant by `name` ('.' or '_' separators)."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return name
    candidates = [k for k in modules if k and module_dir_name(k) == module_dir_name(name)]
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise ValueError(f"module name {name!r} is ambiguous: it matches {candidates}; use '.' separators")
    attribute = _attribute(model, name)
    if attribute is not None and not isinstance(attribute, nn.Module):
        raise TypeError(f"{name!r} is a {type(attribute).__name__}, not an nn.Module: choose a submodule")
    raise ValueError(
        f"No module found for name {name}: no submodule named {name!r}; valid names: "
        f"{[k for k in modules if k]}"
    )


def _attribute(model: nn.Module, name: str) -> Any:
    value: Any = model
    for part in name.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)
