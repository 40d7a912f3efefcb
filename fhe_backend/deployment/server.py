"""The FHE model server: FastAPI on uvicorn, behind ``fhe-backend serve MODELS_DIR``.

MODELS_DIR holds ``<model>/<module>/<input shape>/{client.zip, server.zip}`` as written by
`HybridFHEModel.save_and_clear_private_info` (or `FHEModelDev`). Endpoints:

* ``GET /models``, ``GET /models/{model}/modules``, ``GET /models/{model}/modules/{module}/shapes``
* ``GET .../shapes/{shape}/client``: the module's client.zip (client specs and quantizers)
* ``POST .../shapes/{shape}/keys``: serialized evaluation keys (raw body) -> ``{"key_id"}``
* ``POST .../shapes/{shape}/compute``: ``{"key_id", "inputs": [[base64, ...] per sample]}``
* ``GET /health``; the OpenAPI schema at ``/openapi.json`` (docs at ``/docs``)

Keys are written to ``--keys-dir`` under an unguessable id and cached in memory (LRU, bounded),
so every worker process, a restarted server, or another machine sharing the folder serves them.
Bad requests get 4xx answers naming the field; nothing received is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from fastapi import FastAPI, Path as PathParam, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field, ValidationError

from .fhe_client_server import (
    CLIENT_SPECS,
    CLIENT_ZIP,
    SERVER_INFO,
    SERVER_ZIP,
    FHEModelServer,
    evaluation_key_payload_bytes,
)

logger = logging.getLogger("fhe_backend.server")

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
KEY_ID_PATTERN = r"^[A-Za-z0-9_\-]{32,64}$"
DEFAULT_MAX_BODY_BYTES = 1 << 30
DEFAULT_KEY_CACHE_SIZE = 8
KEY_SIZE_SLACK_BYTES = 64 * 1024  # serialization framing around the key payloads
WORKER_STOP_SECONDS = 60  # a stopping worker finishes the requests it is running


@dataclass
class ServerConfig:
    """Everything a worker needs (picklable: worker processes receive it as an argument)."""

    models_dir: str
    keys_dir: str
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    key_cache_size: int = DEFAULT_KEY_CACHE_SIZE


class NotFound(Exception):
    """A requested model/module/shape/key does not exist (answered with 404)."""


class BadRequest(Exception):
    """A request field is malformed (answered with 400); the message names the field."""


@dataclass
class ModuleEntry:
    """One servable (model, module, input shape): its folder and what is known without loading."""

    path: Path
    input_shapes: List[List[int]]
    key_payload_bytes: Optional[int]
    input_count: int


class ModelRegistry:
    """The models found in MODELS_DIR; circuits are loaded on first use, once per process."""

    def __init__(self, models_dir: Path):
        self.models_dir = models_dir
        self.entries: Dict[str, Dict[str, Dict[str, ModuleEntry]]] = {}
        self._servers: Dict[Path, FHEModelServer] = {}
        self._lock = threading.Lock()
        self.scan()

    def scan(self) -> None:
        """Index ``<model>/<module>/<shape>/server.zip`` (names failing NAME_PATTERN are skipped)."""
        entries: Dict[str, Dict[str, Dict[str, ModuleEntry]]] = {}
        for server_zip in sorted(self.models_dir.glob(f"*/*/*/{SERVER_ZIP}")):
            shape_dir = server_zip.parent
            model, module, shape = shape_dir.parent.parent.name, shape_dir.parent.name, shape_dir.name
            if not all(re.match(NAME_PATTERN, n) for n in (model, module, shape)):
                logger.warning("skipping %s: names must match %s", shape_dir, NAME_PATTERN)
                continue
            try:
                entry = _index_entry(shape_dir)
            except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
                logger.warning("skipping %s: %s", shape_dir, error)
                continue
            entries.setdefault(model, {}).setdefault(module, {})[shape] = entry
        self.entries = entries

    def models(self) -> List[str]:
        """Served model names."""
        return sorted(self.entries)

    def modules(self, model: str) -> Dict[str, Dict[str, ModuleEntry]]:
        """A model's modules; `NotFound` lists the known models."""
        if model not in self.entries:
            raise NotFound(f"unknown model '{model}'; known models: {self.models()}")
        return self.entries[model]

    def shapes(self, model: str, module: str) -> Dict[str, ModuleEntry]:
        """A module's input shapes; `NotFound` lists the known modules."""
        modules = self.modules(model)
        if module not in modules:
            raise NotFound(f"unknown module '{module}' of model '{model}'; known modules: {sorted(modules)}")
        return modules[module]

    def entry(self, model: str, module: str, shape: str) -> ModuleEntry:
        """One servable circuit; `NotFound` lists the known shapes."""
        shapes = self.shapes(model, module)
        if shape not in shapes:
            raise NotFound(f"unknown input shape '{shape}' of module '{module}' of model '{model}'; "
                           f"known shapes: {sorted(shapes)}")
        return shapes[shape]

    def server(self, entry: ModuleEntry) -> FHEModelServer:
        """The loaded circuit of an entry (loaded once per process)."""
        with self._lock:
            if entry.path not in self._servers:
                self._servers[entry.path] = FHEModelServer(entry.path)
            return self._servers[entry.path]


def _index_entry(shape_dir: Path) -> ModuleEntry:
    with zipfile.ZipFile(shape_dir / SERVER_ZIP) as archive:
        info = json.loads(archive.read(SERVER_INFO))
        specs = json.loads(archive.read(CLIENT_SPECS))
    if not (shape_dir / CLIENT_ZIP).is_file():
        raise ValueError(f"{CLIENT_ZIP} missing")
    inputs = specs["circuits"][0]["inputs"]
    return ModuleEntry(shape_dir, info["input_shapes"], evaluation_key_payload_bytes(specs), len(inputs))


class KeyStore:
    """Evaluation keys on disk under unguessable ids, with a bounded in-memory LRU cache."""

    def __init__(self, keys_dir: Path, cache_size: int):
        self.keys_dir = keys_dir
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        self.cache_size = max(1, cache_size)
        self._cache: "OrderedDict[str, Tuple[Any, dict]]" = OrderedDict()
        self._lock = threading.Lock()

    def add(self, serialized: bytes, keys: Any, owner: dict) -> str:
        """Persist keys (atomically) for `owner` ({model, module, input_shape}); returns the id."""
        key_id = secrets.token_urlsafe(32)
        data_path, meta_path = self._paths(key_id)
        temporary = data_path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_bytes(serialized)
        temporary.replace(data_path)
        meta_path.write_text(json.dumps(owner))
        self._remember(key_id, keys, owner)
        return key_id

    def get(self, key_id: str) -> Tuple[Any, dict]:
        """(EvaluationKeys, owner) of an id; `NotFound` when no such keys were uploaded."""
        from concrete import fhe

        with self._lock:
            if key_id in self._cache:
                self._cache.move_to_end(key_id)
                return self._cache[key_id]
        data_path, meta_path = self._paths(key_id)
        if not (data_path.is_file() and meta_path.is_file()):
            raise NotFound(f"unknown key_id '{key_id}': upload evaluation keys first (POST .../keys)")
        owner = json.loads(meta_path.read_text())
        keys = fhe.EvaluationKeys.deserialize(data_path.read_bytes())
        self._remember(key_id, keys, owner)
        return keys, owner

    def _remember(self, key_id: str, keys: Any, owner: dict) -> None:
        with self._lock:
            self._cache[key_id] = (keys, owner)
            self._cache.move_to_end(key_id)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _paths(self, key_id: str) -> Tuple[Path, Path]:
        if not re.match(KEY_ID_PATTERN, key_id):  # ids become file names: never a path
            raise NotFound(f"unknown key_id '{key_id}'")
        return self.keys_dir / f"{key_id}.evk", self.keys_dir / f"{key_id}.json"


class ComputeRequest(BaseModel):
    """Encrypted samples of one batch and the id of the keys they were encrypted for."""

    key_id: str = Field(pattern=KEY_ID_PATTERN, description="id returned by the keys endpoint")
    inputs: List[List[str]] = Field(min_length=1, description="per sample: base64 ciphertext per circuit input")


def create_app(config: ServerConfig) -> FastAPI:
    """The FastAPI application serving the models of `config.models_dir`."""
    registry = ModelRegistry(Path(config.models_dir))
    keystore = KeyStore(Path(config.keys_dir), config.key_cache_size)
    app = FastAPI(title="fhe_backend model server",
                  description="Runs the remote modules of hybrid FHE models on encrypted inputs.")
    app.state.registry, app.state.keystore, app.state.config = registry, keystore, config

    model_param = PathParam(pattern=NAME_PATTERN)
    module_param = PathParam(pattern=NAME_PATTERN)
    shape_param = PathParam(pattern=NAME_PATTERN)

    @app.exception_handler(NotFound)
    async def not_found(_request: Request, error: NotFound):
        return JSONResponse(status_code=404, content={"detail": str(error)})

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Request, error: BadRequest):
        return JSONResponse(status_code=400, content={"detail": str(error)})

    @app.middleware("http")
    async def reject_large_bodies(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            return _too_large(config.max_body_bytes)
        return await call_next(request)

    async def read_body(request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise _BodyTooLarge()
            chunks.append(chunk)
        return b"".join(chunks)

    @app.exception_handler(_BodyTooLarge)
    async def body_too_large(_request: Request, _error: Exception):
        return _too_large(config.max_body_bytes)

    @app.get("/health")
    def health() -> Dict[str, str]:
        """Liveness probe (for load balancers)."""
        return {"status": "ok"}

    @app.get("/models")
    def list_models() -> Dict[str, List[str]]:
        """Names of the served models."""
        return {"models": registry.models()}

    @app.get("/models/{model_name}/modules")
    def list_modules(model_name: str = model_param) -> Dict[str, Any]:
        """Remote modules of a model."""
        return {"model": model_name, "modules": sorted(registry.modules(model_name))}

    @app.get("/models/{model_name}/modules/{module_name}/shapes")
    def list_shapes(model_name: str = model_param, module_name: str = module_param) -> Dict[str, Any]:
        """Input shapes a module is compiled for (one circuit each)."""
        shapes = registry.shapes(model_name, module_name)
        return {"model": model_name, "module": module_name, "input_shapes": sorted(shapes),
                "circuit_input_shapes": {name: e.input_shapes for name, e in sorted(shapes.items())}}

    @app.get("/models/{model_name}/modules/{module_name}/shapes/{input_shape}/client",
             response_class=FileResponse)
    def client_specification(model_name: str = model_param, module_name: str = module_param,
                             input_shape: str = shape_param):
        """The module's client.zip: Concrete client specs, quantizers, versions."""
        entry = registry.entry(model_name, module_name, input_shape)
        return FileResponse(entry.path / CLIENT_ZIP, media_type="application/zip", filename=CLIENT_ZIP)

    @app.post("/models/{model_name}/modules/{module_name}/shapes/{input_shape}/keys",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload_keys(request: Request, model_name: str = model_param, module_name: str = module_param,
                          input_shape: str = shape_param) -> Dict[str, str]:
        """Store serialized evaluation keys (raw body); returns an unguessable key id."""
        entry = registry.entry(model_name, module_name, input_shape)
        body = await read_body(request)
        owner = {"model": model_name, "module": module_name, "input_shape": input_shape}
        key_id = await run_in_threadpool(_store_keys, keystore, entry, body, owner)
        return {"key_id": key_id}

    @app.post("/models/{model_name}/modules/{module_name}/shapes/{input_shape}/compute",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": ComputeRequest.model_json_schema()}}}})
    async def compute(request: Request, model_name: str = model_param, module_name: str = module_param,
                      input_shape: str = shape_param) -> Dict[str, List[List[str]]]:
        """Run the module on each encrypted sample with the uploaded keys."""
        entry = registry.entry(model_name, module_name, input_shape)
        body = await read_body(request)
        try:
            payload = ComputeRequest.model_validate_json(body)
        except ValidationError as error:
            raise RequestValidationError(
                [{**e, "loc": ("body", *e["loc"])} for e in error.errors(include_url=False, include_context=False)])
        owner = {"model": model_name, "module": module_name, "input_shape": input_shape}
        outputs = await run_in_threadpool(_compute, registry, keystore, entry, payload.key_id,
                                          payload.inputs, owner)
        return {"outputs": outputs}

    return app


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(status_code=413, content={
        "detail": f"request body over the server's limit of {limit} bytes (--max-body-bytes)"})


def _store_keys(keystore: KeyStore, entry: ModuleEntry, body: bytes, owner: dict) -> str:
    from concrete import fhe

    if not body:
        raise BadRequest("evaluation_keys: empty request body; send the bytes of "
                         "FHEModelClient.get_serialized_evaluation_keys()")
    expected = entry.key_payload_bytes
    if expected is not None and not expected <= len(body) <= expected + KEY_SIZE_SLACK_BYTES:
        raise BadRequest(
            f"evaluation_keys: {len(body)} bytes do not fit this circuit's key set (~{expected} bytes): "
            f"they were made for another circuit; download this module's client.zip "
            f"(.../shapes/{owner['input_shape']}/client) and generate keys from it")
    try:
        keys = fhe.EvaluationKeys.deserialize(body)
    except RuntimeError as error:
        raise BadRequest(f"evaluation_keys: not serialized Concrete evaluation keys ({_first_line(error)})")
    return keystore.add(body, keys, owner)


def _compute(registry: ModelRegistry, keystore: KeyStore, entry: ModuleEntry, key_id: str,
             inputs: List[List[str]], owner: dict) -> List[List[str]]:
    from concrete import fhe

    from .http_client import decode_sample, encode_sample

    try:
        keys, key_owner = keystore.get(key_id)
    except RuntimeError as error:
        raise BadRequest(f"key_id: the stored keys cannot be read ({_first_line(error)})")
    if key_owner != owner:
        raise BadRequest(f"key_id: these keys were uploaded for {key_owner}, not {owner}; "
                         "upload keys for this module and input shape")
    samples = []
    for index, strings in enumerate(inputs):
        field = f"inputs[{index}]"
        if len(strings) != entry.input_count:
            raise BadRequest(f"{field}: {len(strings)} ciphertext(s) but the circuit takes {entry.input_count}")
        try:
            raw = decode_sample(strings, field)
        except ValueError as error:
            raise BadRequest(str(error))
        values = []
        for position, value in enumerate(raw):
            try:
                values.append(fhe.Value.deserialize(value))
            except RuntimeError as error:
                raise BadRequest(f"{field}[{position}]: not a serialized Concrete ciphertext ({_first_line(error)})")
        samples.append(tuple(values))
    server = registry.server(entry)
    outputs = []
    for index, sample in enumerate(samples):
        try:
            result = server.run(sample, keys)
        except (RuntimeError, ValueError) as error:
            raise BadRequest(f"inputs[{index}]: the ciphertext does not fit module '{owner['module']}' "
                             f"input shape {entry.input_shapes} ({_first_line(error)})")
        outputs.append(encode_sample(result))
    return outputs


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return " ".join(text.splitlines()[:3])[:500]


# ---- the `fhe-backend serve` subcommand -------------------------------------------------


def add_arguments(parser) -> None:
    """Options of `fhe-backend serve`."""
    parser.add_argument("models_dir", metavar="MODELS_DIR",
                        help="folder of <model>/<module>/<input shape>/{client,server}.zip")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--keys-dir", required=True,
                        help="where uploaded evaluation keys are stored; share it between workers and machines")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"largest accepted request body, bytes (default {DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("--key-cache-size", type=int, default=DEFAULT_KEY_CACHE_SIZE,
                        help=f"evaluation keys kept in memory per worker (default {DEFAULT_KEY_CACHE_SIZE})")
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default info)")


def run(args) -> int:
    """Start uvicorn with `args.workers` workers (all serve every model and every key)."""
    import uvicorn

    models_dir = Path(args.models_dir)
    if not models_dir.is_dir():
        print(f"fhe-backend serve: MODELS_DIR {models_dir} is not a folder")
        return 2
    config = ServerConfig(str(models_dir.resolve()), str(Path(args.keys_dir).resolve()),
                          args.max_body_bytes, args.key_cache_size)
    uvicorn_config = uvicorn.Config(None, host=args.host, port=args.port, log_level=args.log_level)
    if args.workers <= 1:
        uvicorn_config.app = create_app(config)
        uvicorn.Server(uvicorn_config).run()
        return 0
    return WorkerSupervisor(config, uvicorn_config, args.workers).run()


class WorkerSupervisor:
    """Worker processes serving one listening socket; restarted when they die, stopped on a signal.

    uvicorn's own supervisor pings its workers and waits for each answer up to its health-check
    timeout; a worker that dies before answering (SIGTERM or Ctrl-C to the process group while it
    still imports torch) kept it waiting that long. This one only watches exit codes.
    """

    def __init__(self, config: ServerConfig, uvicorn_config, workers: int):
        self.config, self.uvicorn_config, self.workers = config, uvicorn_config, workers
        self.stopping = False
        self.processes: List[Any] = []

    def run(self) -> int:
        """Serve until SIGINT or SIGTERM; 1 when a worker could not start, else 0."""
        import multiprocessing
        import signal
        import time

        from uvicorn.config import STARTUP_FAILURE

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._request_stop)
        listener = self.uvicorn_config.bind_socket()
        context = multiprocessing.get_context("spawn")
        self.processes = [self._start(context, listener) for _ in range(self.workers)]
        status = 0
        while not self.stopping:
            time.sleep(0.5)
            for index, process in enumerate(self.processes):
                if self.stopping or process.exitcode is None:
                    continue
                if process.exitcode == STARTUP_FAILURE:
                    logger.error("worker %d could not start (its error is above); stopping", process.pid)
                    status, self.stopping = 1, True
                else:
                    logger.warning("worker %d exited with code %s; starting another", process.pid,
                                   process.exitcode)
                    self.processes[index] = self._start(context, listener)
        self._stop_all()
        listener.close()
        return status

    def _request_stop(self, *_signal) -> None:
        self.stopping = True

    def _start(self, context, listener):
        process = context.Process(target=_serve_worker, args=(self.config, self.uvicorn_config, listener))
        process.start()
        return process

    def _stop_all(self) -> None:
        for process in self.processes:
            if process.exitcode is None:
                process.terminate()
        for process in self.processes:
            process.join(WORKER_STOP_SECONDS)
            if process.exitcode is None:
                logger.warning("worker %d did not stop in %d s; killing it", process.pid, WORKER_STOP_SECONDS)
                process.kill()
                process.join()


def _serve_worker(config: ServerConfig, uvicorn_config, listener) -> None:
    """One worker process: load the models, then serve the inherited socket until SIGTERM."""
    import sys

    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    uvicorn_config.configure_logging()
    try:
        uvicorn_config.app = create_app(config)
    except KeyboardInterrupt:
        return
    except Exception:
        logger.exception("worker %d could not load the models in %s", os.getpid(), config.models_dir)
        sys.exit(STARTUP_FAILURE)
    try:
        uvicorn.Server(uvicorn_config).run(sockets=[listener])
    except KeyboardInterrupt:
        pass
