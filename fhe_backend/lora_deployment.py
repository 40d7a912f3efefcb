"""Deployment of a LoRA model's frozen linears: server artifacts, the client connection, and the
client model without the private weights.

`fhe_backend.lora.LoraTrainer` trains; this module ships what it compiled. Each frozen linear
(an ``FheMatmul`` of `fhe_backend.lora`, one direction of a frozen layer) is one FHE partition.
`LoraDeployment` wraps each in a `fhe_backend.hybrid_model.RemoteModule` so that the layout on
disk and on the wire is the hybrid model's: ``<models dir>/<model>/<module>/<input shape>/``
with ``client.zip`` and ``server.zip``, served by ``fhe-backend serve``.

`LoraTrainer.save_server_artifacts`, `LoraTrainer.init_client` and
`LoraTrainer.save_and_clear_private_info` (Concrete ML's API) delegate here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

from .errors import NotCompiledError
from .hybrid_model import RemoteModule
from .runtime import FhePartition

CLIENT_MODEL_STATE = "client_model_state.pt"
REMOTE_MODULES_FILE = "remote_modules.pt"


class LoraDeployment:
    """Ships the compiled frozen linears of a LoRA model.

    remote_matmuls: returns the frozen linears (``FheMatmul``) by remote module name, as they are
    now (the trainer's list changes when it compiles again). logger: where progress is logged.
    """

    def __init__(
        self, remote_matmuls: Callable[[], Mapping[str, Any]], logger: Optional[logging.Logger] = None
    ):
        self._remote_matmuls = remote_matmuls
        self.logger = logger or logging.getLogger("fhe_backend.lora")
        self.remote_clients: Dict[str, RemoteModule] = {}  # set by init_client

    def partitions(self) -> Dict[str, FhePartition]:
        """The FHE partitions of the frozen linears, by remote module name (compiled ones)."""
        return {
            name: matmul.partition
            for name, matmul in self._remote_matmuls().items()
            if matmul.partition is not None
        }

    def remote_modules(
        self, server_remote_address: Optional[str], model_name: str
    ) -> Dict[str, RemoteModule]:
        """A hybrid-model `RemoteModule` around each frozen linear's partition."""
        modules = {}
        for name, matmul in self._remote_matmuls().items():
            if matmul.partition is None:
                raise NotCompiledError(f"'{name}' is not compiled: call LoraTrainer.compile(inputset) first")
            remote = RemoteModule(None, server_remote_address, module_name=name, model_name=model_name)
            remote.graph, remote.partition = matmul.graph, matmul.partition
            remote.input_shape = tuple(matmul.partition.statistics["input_shape"][0])
            modules[name] = remote
        return modules

    def save_server_artifacts(self, path: str) -> List[str]:
        """Write each frozen linear's ``client.zip``/``server.zip`` under
        ``path/<module>/<input shape>/`` (the layout of `fhe_backend.hybrid_model`): serve the
        parent folder with ``fhe-backend serve``, `path`'s name being the model name. Returns
        the folders written."""
        return [
            str(remote.save_artifacts(Path(path) / remote.url_name))
            for remote in self.remote_modules(None, Path(path).name).values()
        ]

    def init_client(
        self,
        server_remote_address: str,
        model_name: str = "model",
        path_to_clients: Optional[str] = None,
        path_to_keys: Optional[str] = None,
    ) -> None:
        """Connect every frozen linear to the FHE server: keys generated here, evaluation keys
        uploaded, each partition's ``remote_runner`` set, so that mode "remote" runs them there."""
        self.remote_clients = self.remote_modules(server_remote_address, model_name)
        for remote in self.remote_clients.values():
            folder = remote.url_name
            remote.init_fhe_client(
                Path(path_to_clients) / folder if path_to_clients else None,
                Path(path_to_keys) / folder if path_to_keys else None,
            )

    def save_and_clear_private_info(self, path: str, client_model: nn.Module) -> None:
        """Save the client's model (public weights, LoRA adapters) and each frozen linear's
        input quantizers and row layout under the directory `path`, then drop the clear frozen
        weights from the linears: after this they run only in FHE modes (simulate, execute,
        remote). The frozen weights are in no file written here."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        remote = dict(self._remote_matmuls())
        for matmul in remote.values():
            matmul.clear_private_info()
            if matmul.mode == "torch" and matmul.partition is not None:
                matmul.mode = "simulate"
        torch.save(client_model.state_dict(), directory / CLIENT_MODEL_STATE)
        specs = {
            name: {
                "input_quantizers": [q.to_dict() for q in m.partition.program.input_quantizers],
                "anchor": m.anchor,
                "bias_columns": m.bias_columns,
                "dynamic": m.dynamic,
                "rows_per_circuit": m.rows_per_circuit,
            }
            for name, m in remote.items()
            if m.partition is not None
        }
        torch.save({"remote_names": list(remote), "remote_specs": specs}, directory / REMOTE_MODULES_FILE)
        self.logger.info(
            "saved the client model to %s; private weights of %d remote module(s) cleared",
            directory,
            len(remote),
        )


__all__ = ["LoraDeployment"]
