"""The FHE model server: FastAPI on uvicorn, behind ``fhe-backend serve MODELS_DIR``.

MODELS_DIR holds ``<model>/<module>/<input shape>/{client.zip, server.zip}`` as written by
`HybridFHEModel.save_and_clear_private_info` (or `FHEModelDev`). Endpoints:

* ``GET /models``, ``GET /models/{model}/modules``, ``GET /models/{model}/modules/{module}/shapes``
* ``GET .../shapes/{shape}/client``: the module's client.zip (client specs and quantizers)
* ``POST .../shapes/{shape}/keys``: serialized evaluation keys (raw body) -> ``{"key_id", "expires"}``
* ``DELETE .../shapes/{shape}/keys/{key_id}``: forget uploaded keys
* ``POST .../shapes/{shape}/compute``: ``{"key_id", "inputs": [[base64, ...] per sample]}``
* ``GET /health``: 200 when keys can be stored and computations run, else 503 saying why;
  the OpenAPI schema at ``/openapi.json`` (docs at ``/docs``)

This application is the single source of endpoints, validation and limits, whatever runs it
(uvicorn here). Every limit is a field of `ServerSettings` with a safe default and a
``fhe-backend serve`` flag. Keys go through a `KeyStore` (`fhe_backend.deployment.keystore`);
every key and ciphertext is checked against the circuit's client specification before
Concrete reads it (`fhe_backend.deployment.wire`); computations run in supervised child
processes (`fhe_backend.deployment.compute`), so a native crash fails one request and
quarantines the keys it used. Nothing received is unpickled.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
import zipfile
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

from .compute import ComputeCrashed, ComputeError, ComputePool
from .fhe_client_server import (
    CLIENT_ZIP,
    SERVER_ZIP,
    DeploymentError,
    read_server_info,
)
from .http_client import ignore_sigpipe
from .keystore import (
    KEY_ID_PATTERN,
    FolderKeyStore,
    KeyQuota,
    KeyRecord,
    KeyStore,
    KeyStoreUnavailable,
    QuarantinedKey,
    QuotaExceeded,
    UnknownKey,
    new_key_id,
)
from .wire import WireFormatError, check_ciphertext, check_evaluation_keys

logger = logging.getLogger("fhe_backend.server")

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
WORKER_STOP_SECONDS = 60  # a stopping worker finishes the requests it is running
KEEP_ALIVE_SECONDS = 30  # idle keep-alive connections; longer than a client's usual wait between requests
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
MIN_API_KEY_CHARS = 16

GiB = 1 << 30


def _limit(default: Any, help_text: str):
    """A `ServerSettings` field that is also a ``fhe-backend serve`` flag."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class ServerSettings:
    """Everything a server worker needs: folders, limits and authentication (picklable).

    Every field but the folders is a ``fhe-backend serve --flag`` (underscores become dashes)
    with the default shown; ``None`` means unlimited where a field allows it.
    """

    models_dir: str
    keys_dir: str
    max_body_bytes: int = _limit(GiB, "largest request body, bytes (evaluation keys are the largest)")
    body_idle_timeout_seconds: float = _limit(
        30.0, "longest wait for the next piece of a request body; slower clients get 408"
    )
    body_timeout_seconds: float = _limit(600.0, "longest time to receive a whole request body (408 after)")
    max_samples_per_request: int = _limit(64, "encrypted samples in one compute request (413 above)")
    max_concurrent_computes: int = _limit(
        2, "computations running at once per worker, each in its own child process (503 + Retry-After above)"
    )
    compute_queue_seconds: float = _limit(
        10.0, "how long a compute request waits for a free compute process before the 503"
    )
    retry_after_seconds: int = _limit(5, "Retry-After of a 503 answered when every compute process is busy")
    key_cache_size: int = _limit(8, "deserialized evaluation keys kept in memory per compute process")
    key_cache_bytes: int = _limit(2 * GiB, "bytes of evaluation keys kept in memory per compute process")
    max_keys_per_model: Optional[int] = _limit(
        256, "stored key sets per model (429 above; DELETE or expiry frees)"
    )
    max_key_bytes_per_model: Optional[int] = _limit(64 * GiB, "bytes of stored keys per model (429 above)")
    key_ttl_seconds: Optional[float] = _limit(86400.0, "stored keys expire this long after upload")
    api_keys_file: Optional[str] = _limit(
        None,
        "file of API keys (one per line, at least 16 characters): every request but /health must send "
        "'Authorization: Bearer <key>', and keys uploaded with one API key serve only that API key",
    )
    max_connections: int = _limit(512, "open connections per worker (uvicorn's limit_concurrency; 503 above)")

    def quota(self) -> KeyQuota:
        """The per-model key quota."""
        return KeyQuota(self.max_keys_per_model, self.max_key_bytes_per_model)


ServerConfig = ServerSettings  # the earlier name


# ---- errors answered with 4xx/5xx -------------------------------------------------------------


class NotFound(Exception):
    """A requested model/module/shape/key does not exist (answered with 404)."""


class BadRequest(Exception):
    """A request field is malformed (answered with 400); the message names the field."""


class HttpError(Exception):
    """An error with its own status code and headers."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.headers = status, headers


class ClientDisconnected(Exception):
    """The client went away while its request was being read or computed."""


# ---- models ----------------------------------------------------------------------------------


@dataclass
class ModuleEntry:
    """One servable (model, module, input shape): its folder and its client specification."""

    path: Path
    input_shapes: List[List[int]]
    specs: Dict[str, Any]

    @property
    def gates(self) -> List[Dict[str, Any]]:
        """The circuit's input descriptions (one per ciphertext of a sample)."""
        return self.specs["circuits"][0]["inputs"]


class ModelRegistry:
    """The models found in MODELS_DIR (their client specifications are read at start-up)."""

    def __init__(self, models_dir: Path):
        self.models_dir = models_dir
        self.entries: Dict[str, Dict[str, Dict[str, ModuleEntry]]] = {}
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
            except (OSError, KeyError, ValueError, zipfile.BadZipFile, DeploymentError) as error:
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
            raise NotFound(
                f"unknown input shape '{shape}' of module '{module}' of model '{model}'; "
                f"known shapes: {sorted(shapes)}"
            )
        return shapes[shape]


def _index_entry(shape_dir: Path) -> ModuleEntry:
    input_shapes, specs = read_server_info(shape_dir)
    if not (shape_dir / CLIENT_ZIP).is_file():
        raise ValueError(f"{CLIENT_ZIP} missing")
    return ModuleEntry(shape_dir, [list(shape) for shape in input_shapes], json.loads(specs))


# ---- authentication ----------------------------------------------------------------------------


def load_api_keys(path: str) -> FrozenSet[str]:
    """SHA-256 digests of the API keys of `path` (one per line; blank lines and ``#`` comments skipped).

    Raises `ValueError` naming the file and line when it cannot be used.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--api-keys-file {path}: cannot read it ({error})") from error
    digests = set()
    for number, line in enumerate(lines, 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if len(token) < MIN_API_KEY_CHARS or not token.isprintable() or " " in token:
            raise ValueError(
                f"--api-keys-file {path} line {number}: an API key must be at least "
                f"{MIN_API_KEY_CHARS} printable characters without spaces "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        digests.add(_digest(token))
    if not digests:
        raise ValueError(f"--api-keys-file {path}: no API key in it (one per line)")
    return frozenset(digests)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _caller(scope: Dict[str, Any], api_keys: Optional[FrozenSet[str]]) -> Tuple[bool, Optional[str]]:
    """(allowed, digest of the caller's API key) for a request scope."""
    if api_keys is None:
        return True, None
    header = dict(scope.get("headers") or []).get(b"authorization", b"")
    scheme, _, token = header.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False, None
    digest = _digest(token.strip())
    matched = False
    for known in api_keys:  # compare with every key: the time taken does not depend on which matched
        matched |= hmac.compare_digest(known, digest)
    return matched, digest if matched else None


# ---- the HTTP guard: framing, body size, authentication ---------------------------------------


class RequestGuard:
    """ASGI middleware run before routing: refuses what must never reach an endpoint.

    * ``Content-Length`` together with ``Transfer-Encoding``, several ``Content-Length`` headers,
      or a malformed one -> 400 (request smuggling behind proxies);
    * a declared body over ``max_body_bytes`` -> 413;
    * without a valid bearer API key (when the server has API keys) -> 401.
    """

    def __init__(self, app, settings: ServerSettings, api_keys: Optional[FrozenSet[str]]):
        self.app, self.settings, self.api_keys = app, settings, api_keys

    async def __call__(self, scope, receive, send):
        """Answer refused requests here; pass the others to the application."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = [(name.lower(), value) for name, value in scope.get("headers") or []]
        lengths = [value for name, value in headers if name == b"content-length"]
        chunked = any(name == b"transfer-encoding" for name, _ in headers)
        problem = None
        if lengths and chunked:
            problem = (400, "both Content-Length and Transfer-Encoding: send one of them")
        elif len(lengths) > 1:
            problem = (400, "several Content-Length headers: send one")
        elif lengths and not lengths[0].isdigit():
            problem = (400, "Content-Length is not a number")
        elif lengths and int(lengths[0]) > self.settings.max_body_bytes:
            problem = (413, _too_large_message(self.settings.max_body_bytes))
        elif scope["path"] not in OPEN_PATHS:
            allowed, digest = _caller(scope, self.api_keys)
            if not allowed:
                problem = (
                    401,
                    "missing or unknown API key: send 'Authorization: Bearer <API key>' "
                    "(the server was started with --api-keys-file)",
                )
            scope.setdefault("state", {})["api_key_digest"] = digest
        if problem is None:
            return await self.app(scope, receive, send)
        status, message = problem
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        response = JSONResponse(status_code=status, content={"detail": message}, headers=headers)
        if status != 401:
            response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _too_large_message(limit: int) -> str:
    return f"request body over the server's limit of {limit} bytes (--max-body-bytes)"


async def read_body(request: Request, settings: ServerSettings) -> bytes:
    """The whole request body, within the size limit and the read timeouts (413, 408).

    Raises `ClientDisconnected` when the client goes away first.
    """
    chunks, size = [], 0
    deadline = time.monotonic() + settings.body_timeout_seconds
    while True:
        wait = min(settings.body_idle_timeout_seconds, deadline - time.monotonic())
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            message = await asyncio.wait_for(request.receive(), wait)
        except asyncio.TimeoutError:
            raise HttpError(
                408,
                f"the request body did not arrive in time ({size} bytes received; the server "
                f"waits {settings.body_idle_timeout_seconds:g} s for each piece and "
                f"{settings.body_timeout_seconds:g} s in all: --body-idle-timeout-seconds, "
                "--body-timeout-seconds)",
                {"Connection": "close"},
            ) from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnected(f"after {size} bytes of the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > settings.max_body_bytes:
            raise HttpError(413, _too_large_message(settings.max_body_bytes), {"Connection": "close"})
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


# ---- the application ---------------------------------------------------------------------------


class ComputeRequest(BaseModel):
    """Encrypted samples of one batch and the id of the keys they were encrypted for."""

    key_id: str = Field(pattern=KEY_ID_PATTERN, description="id returned by the keys endpoint")
    inputs: List[List[str]] = Field(
        min_length=1, description="per sample: base64 ciphertext per circuit input"
    )


def _validation_errors(errors: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Validation errors without the offending input (it may not even be JSON-encodable)."""
    return [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in errors
    ]


def create_app(settings: ServerSettings, keystore: Optional[KeyStore] = None) -> FastAPI:
    """The FastAPI application serving the models of `settings.models_dir`.

    keystore: where keys live (default: a `FolderKeyStore` of `settings.keys_dir`). Raises
    `KeyStoreUnavailable` when keys cannot be stored and `ValueError` for an unusable API-keys file.
    """
    if threading.current_thread() is threading.main_thread():
        ignore_sigpipe()  # a client closing its connection must not kill the worker
    registry = ModelRegistry(Path(settings.models_dir))
    keystore = keystore if keystore is not None else FolderKeyStore(Path(settings.keys_dir))
    keystore.check()
    api_keys = load_api_keys(settings.api_keys_file) if settings.api_keys_file else None
    pool = ComputePool(settings.max_concurrent_computes, settings.key_cache_size, settings.key_cache_bytes)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        circuits = [
            entry.path
            for modules in registry.entries.values()
            for shapes in modules.values()
            for entry in shapes.values()
        ]
        await run_in_threadpool(pool.start, circuits)
        yield
        await run_in_threadpool(pool.stop)  # the compute processes end with the worker

    app = FastAPI(
        title="fhe_backend model server",
        lifespan=lifespan,
        description="Runs the remote modules of hybrid FHE models on encrypted inputs.",
    )
    app.state.registry, app.state.keystore, app.state.settings, app.state.pool = (
        registry,
        keystore,
        settings,
        pool,
    )
    app.add_middleware(RequestGuard, settings=settings, api_keys=api_keys)

    model_param = PathParam(pattern=NAME_PATTERN)
    module_param = PathParam(pattern=NAME_PATTERN)
    shape_param = PathParam(pattern=NAME_PATTERN)

    def answer(status: int, message: str, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
        return JSONResponse(status_code=status, content={"detail": message}, headers=headers)

    handlers = {
        NotFound: 404,
        UnknownKey: 404,
        BadRequest: 400,
        QuarantinedKey: 400,
        QuotaExceeded: 429,
        KeyStoreUnavailable: 503,
    }
    for error_type, status in handlers.items():
        app.add_exception_handler(error_type, lambda _r, error, status=status: answer(status, str(error)))

    @app.exception_handler(HttpError)
    async def http_error(_request: Request, error: HttpError):
        return answer(error.status, str(error), error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError):
        return JSONResponse(status_code=422, content={"detail": _validation_errors(error.errors())})

    @app.exception_handler(ClientDisconnected)
    async def disconnected(request: Request, error: ClientDisconnected):
        logger.info(
            "client %s disconnected during %s %s (%s)",
            _client(request),
            request.method,
            request.url.path,
            error,
        )
        return Response(status_code=499)  # nobody reads it: the connection is gone

    @app.get("/health")
    def health() -> JSONResponse:
        """Readiness for load balancers: 200 when keys can be stored, else 503 saying why."""
        try:
            keystore.check()
        except KeyStoreUnavailable as error:
            return JSONResponse(status_code=503, content={"status": "unavailable", "detail": str(error)})
        return JSONResponse(
            {"status": "ok", "keys": "writable", "models": len(registry.models()), "compute": pool.stats()}
        )

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
        return {
            "model": model_name,
            "module": module_name,
            "input_shapes": sorted(shapes),
            "circuit_input_shapes": {name: e.input_shapes for name, e in sorted(shapes.items())},
        }

    @app.get(
        "/models/{model_name}/modules/{module_name}/shapes/{input_shape}/client", response_class=FileResponse
    )
    def client_specification(
        model_name: str = model_param, module_name: str = module_param, input_shape: str = shape_param
    ):
        """The module's client.zip: Concrete client specs, quantizers, versions."""
        entry = registry.entry(model_name, module_name, input_shape)
        return FileResponse(entry.path / CLIENT_ZIP, media_type="application/zip", filename=CLIENT_ZIP)

    @app.post(
        "/models/{model_name}/modules/{module_name}/shapes/{input_shape}/keys",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def upload_keys(
        request: Request,
        model_name: str = model_param,
        module_name: str = module_param,
        input_shape: str = shape_param,
    ) -> Dict[str, Any]:
        """Store serialized evaluation keys (raw body) checked against the circuit; returns their id."""
        entry = registry.entry(model_name, module_name, input_shape)
        body = await read_body(request, settings)
        if not body:
            raise BadRequest(
                "evaluation_keys: empty request body; send the bytes of "
                "FHEModelClient.get_serialized_evaluation_keys()"
            )
        try:
            await run_in_threadpool(check_evaluation_keys, body, entry.specs)
        except WireFormatError as error:
            raise BadRequest(
                f"{error} (module '{module_name}', input shape {input_shape}: download its client "
                f"specification from .../shapes/{input_shape}/client)"
            ) from None
        now = time.time()
        expires = now + settings.key_ttl_seconds if settings.key_ttl_seconds else None
        record = KeyRecord(
            new_key_id(), model_name, module_name, input_shape, len(body), now, expires, _api_key(request)
        )
        await run_in_threadpool(keystore.expire, now)
        await run_in_threadpool(keystore.add, record, body, settings.quota())
        return {"key_id": record.key_id, "expires": expires}

    @app.delete(
        "/models/{model_name}/modules/{module_name}/shapes/{input_shape}/keys/{key_id}", status_code=204
    )
    async def delete_keys(
        request: Request,
        key_id: str,
        model_name: str = model_param,
        module_name: str = module_param,
        input_shape: str = shape_param,
    ) -> Response:
        """Forget uploaded evaluation keys (only the API key that uploaded them may)."""
        registry.entry(model_name, module_name, input_shape)
        record = await run_in_threadpool(
            _owned_record, keystore, key_id, request, model_name, module_name, input_shape, True
        )
        await run_in_threadpool(keystore.delete, record.key_id)
        pool.forget(record.key_id)
        return Response(status_code=204)

    @app.post(
        "/models/{model_name}/modules/{module_name}/shapes/{input_shape}/compute",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ComputeRequest.model_json_schema()}},
            }
        },
    )
    async def compute(
        request: Request,
        model_name: str = model_param,
        module_name: str = module_param,
        input_shape: str = shape_param,
    ) -> Dict[str, List[List[str]]]:
        """Run the module on each encrypted sample with the uploaded keys."""
        entry = registry.entry(model_name, module_name, input_shape)
        body = await read_body(request, settings)
        try:
            payload = ComputeRequest.model_validate_json(body)
        except ValidationError as error:
            raise RequestValidationError(
                [
                    {**e, "loc": ("body", *e["loc"])}
                    for e in error.errors(include_url=False, include_context=False, include_input=False)
                ]
            ) from None
        if len(payload.inputs) > settings.max_samples_per_request:
            raise HttpError(
                413,
                f"inputs: {len(payload.inputs)} samples, the server's limit is "
                f"{settings.max_samples_per_request} per request (--max-samples-per-request): "
                "split the batch",
            )
        record = await run_in_threadpool(
            _owned_record, keystore, payload.key_id, request, model_name, module_name, input_shape, False
        )
        samples = await run_in_threadpool(_decode_samples, entry, payload.inputs)
        process = await _acquire(pool, request, settings)
        try:
            outputs = []
            for index, sample in enumerate(samples):
                if await request.is_disconnected():
                    raise ClientDisconnected(f"compute stopped after {index} of {len(samples)} samples")
                outputs.append(
                    await run_in_threadpool(
                        _run_sample, process, keystore, pool, entry, record, sample, index
                    )
                )
        finally:
            pool.release(process)
        return {"outputs": outputs}

    return app


async def _acquire(pool: ComputePool, request: Request, settings: ServerSettings):
    """A free compute process, waiting up to `compute_queue_seconds`; else 503 with Retry-After."""
    deadline = time.monotonic() + settings.compute_queue_seconds
    while True:
        process = pool.try_acquire()
        if process is not None:
            return process
        if time.monotonic() >= deadline:
            raise HttpError(
                503,
                f"all {pool.size} computations of this worker are busy "
                f"(--max-concurrent-computes, waited {settings.compute_queue_seconds:g} s, "
                "--compute-queue-seconds): retry later",
                {"Retry-After": str(settings.retry_after_seconds)},
            )
        if await request.is_disconnected():
            raise ClientDisconnected("while waiting for a compute process")
        await asyncio.sleep(0.05)


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "?"


def _api_key(request: Request) -> Optional[str]:
    return request.scope.get("state", {}).get("api_key_digest")


def _owned_record(
    keystore: KeyStore,
    key_id: str,
    request: Request,
    model: str,
    module: str,
    shape: str,
    quarantined_ok: bool,
) -> KeyRecord:
    """The record of `key_id`, checked to belong to the caller and to this module and shape."""
    try:
        record = keystore.record(key_id)
    except QuarantinedKey as error:
        if not quarantined_ok:
            raise
        record = error.record
    if record.owner is not None and not hmac.compare_digest(record.owner, _api_key(request) or ""):
        raise HttpError(403, f"key_id '{key_id}' was uploaded with another API key: upload keys with yours")
    target = {"model": model, "module": module, "input_shape": shape}
    if record.target() != target:
        raise BadRequest(
            f"key_id: these keys were uploaded for {record.target()}, not {target}; "
            "upload keys for this module and input shape"
        )
    return record


def _decode_samples(entry: ModuleEntry, inputs: List[List[str]]) -> List[Tuple[bytes, ...]]:
    """Base64 -> bytes, each ciphertext checked against the circuit's input (400 naming the field)."""
    samples = []
    for index, strings in enumerate(inputs):
        field_name = f"inputs[{index}]"
        if len(strings) != len(entry.gates):
            raise BadRequest(
                f"{field_name}: {len(strings)} ciphertext(s) but the circuit takes {len(entry.gates)}"
            )
        values = []
        for position, (text, gate) in enumerate(zip(strings, entry.gates)):
            try:
                value = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as error:
                raise BadRequest(f"{field_name}[{position}] is not valid base64: {error}") from None
            try:
                check_ciphertext(value, gate, f"{field_name}[{position}]")
            except WireFormatError as error:
                raise BadRequest(f"{error} (input shape {entry.input_shapes})") from None
            values.append(value)
        samples.append(tuple(values))
    return samples


def _run_sample(
    process,
    keystore: KeyStore,
    pool: ComputePool,
    entry: ModuleEntry,
    record: KeyRecord,
    sample: Tuple[bytes, ...],
    index: int,
) -> List[str]:
    """One sample in the compute process; crashes and key errors quarantine the keys."""
    try:
        result = process.run(entry.path, record.key_id, lambda: keystore.data(record.key_id), sample)
    except ComputeCrashed as crash:
        reason = f"a computation with them crashed ({crash}) on {time.strftime('%Y-%m-%d %H:%M:%S')}"
        _quarantine(keystore, pool, record, reason)
        raise BadRequest(
            f"inputs[{index}]: computation failed: {crash} with key_id '{record.key_id}'; the keys "
            "are quarantined: generate fresh keys from this module's client.zip and upload them"
        ) from None
    except ComputeError as error:
        if error.kind == "keys":
            _quarantine(keystore, pool, record, f"Concrete cannot read them ({error})")
            raise BadRequest(
                f"key_id: the stored keys cannot be read ({error}); they are quarantined: upload fresh keys"
            ) from None
        if error.kind == "inputs":
            raise BadRequest(
                f"inputs[{index}]: the ciphertext does not fit module '{record.module}' "
                f"input shape {entry.input_shapes} ({error})"
            ) from None
        raise HttpError(500, f"computation failed on the server ({error}); see the server log") from None
    return [base64.b64encode(value).decode("ascii") for value in result]


def _quarantine(keystore: KeyStore, pool: ComputePool, record: KeyRecord, reason: str) -> None:
    logger.error("quarantining key_id %s... (%s): %s", record.key_id[:8], record.target(), reason)
    pool.forget(record.key_id)
    try:
        keystore.quarantine(record.key_id, reason)
    except (OSError, KeyStoreUnavailable) as error:
        logger.error("could not quarantine key_id %s...: %s", record.key_id[:8], error)


# ---- the `fhe-backend serve` subcommand -------------------------------------------------


def add_arguments(parser) -> None:
    """Options of `fhe-backend serve` (every `ServerSettings` limit is a flag)."""
    parser.add_argument(
        "models_dir",
        metavar="MODELS_DIR",
        help="folder of <model>/<module>/<input shape>/{client,server}.zip",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument(
        "--keys-dir",
        required=True,
        help="where uploaded evaluation keys are stored; share it between workers and machines",
    )
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    for setting in fields(ServerSettings):
        if "help" not in setting.metadata:
            continue
        kind = {
            "int": int,
            "float": float,
            "Optional[int]": _optional(int),
            "Optional[float]": _optional(float),
        }.get(str(setting.type), str)
        parser.add_argument(
            "--" + setting.name.replace("_", "-"),
            type=kind,
            default=setting.default,
            help=f"{setting.metadata['help']} (default {setting.default})"
            + (
                "; 'none' for no limit"
                if "Optional" in str(setting.type) and setting.default is not None
                else ""
            ),
        )
    parser.add_argument("--ssl-keyfile", help="TLS private key (PEM): serve HTTPS directly with uvicorn")
    parser.add_argument("--ssl-certfile", help="TLS certificate chain (PEM), with --ssl-keyfile")
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default info)")


def _configure_logging(level: str) -> None:
    """The server's own lines (disconnects, quarantines) at uvicorn's --log-level."""
    server_logger = logging.getLogger("fhe_backend")
    server_logger.setLevel(level.upper())
    if not server_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     fhe_backend: %(message)s"))
        server_logger.addHandler(handler)


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "0", "off") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def settings_from_args(args) -> ServerSettings:
    """The `ServerSettings` of parsed `fhe-backend serve` arguments."""
    limits = {s.name: getattr(args, s.name) for s in fields(ServerSettings) if "help" in s.metadata}
    return ServerSettings(str(Path(args.models_dir).resolve()), str(Path(args.keys_dir).resolve()), **limits)


def startup_problem(settings: ServerSettings) -> Optional[str]:
    """Why the server cannot start (keys folder not writable, bad API-keys file), or None."""
    try:
        FolderKeyStore(Path(settings.keys_dir)).check()
        if settings.api_keys_file:
            load_api_keys(settings.api_keys_file)
    except (KeyStoreUnavailable, ValueError) as error:
        return str(error)
    return None


def run(args) -> int:
    """Start uvicorn with `args.workers` workers (all serve every model and every key)."""
    import uvicorn

    models_dir = Path(args.models_dir)
    if not models_dir.is_dir():
        print(f"fhe-backend serve: MODELS_DIR {models_dir} is not a folder")
        return 2
    settings = settings_from_args(args)
    _configure_logging(args.log_level)
    problem = startup_problem(settings)
    if problem:
        print(f"fhe-backend serve: {problem}")
        return 1
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        print("fhe-backend serve: --ssl-keyfile and --ssl-certfile go together")
        return 2
    uvicorn_config = uvicorn.Config(
        None,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
    )
    if args.workers <= 1:
        uvicorn_config.app = create_app(settings)
        uvicorn.Server(uvicorn_config).run()
        return 0
    return WorkerSupervisor(settings, uvicorn_config, args.workers).run()


class WorkerSupervisor:
    """Worker processes serving one listening socket; restarted when they die, stopped on a signal.

    uvicorn's own supervisor pings its workers and waits for each answer up to its health-check
    timeout; a worker that dies before answering (SIGTERM or Ctrl-C to the process group while it
    still imports torch) kept it waiting that long. This one only watches exit codes.
    """

    def __init__(self, settings: ServerSettings, uvicorn_config, workers: int):
        self.settings, self.uvicorn_config, self.workers = settings, uvicorn_config, workers
        self.stopping = False
        self.processes: List[Any] = []

    def run(self) -> int:
        """Serve until SIGINT or SIGTERM; 1 when a worker could not start, else 0."""
        import multiprocessing
        import signal

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
                    logger.warning(
                        "worker %d exited with code %s; starting another", process.pid, process.exitcode
                    )
                    self.processes[index] = self._start(context, listener)
        self._stop_all()
        listener.close()
        return status

    def _request_stop(self, *_signal) -> None:
        self.stopping = True

    def _start(self, context, listener):
        process = context.Process(target=_serve_worker, args=(self.settings, self.uvicorn_config, listener))
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


def _serve_worker(settings: ServerSettings, uvicorn_config, listener) -> None:
    """One worker process: load the models, then serve the inherited socket until SIGTERM."""
    import sys

    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    uvicorn_config.configure_logging()
    _configure_logging(uvicorn_config.log_level if isinstance(uvicorn_config.log_level, str) else "info")
    try:
        uvicorn_config.app = create_app(settings)
    except KeyboardInterrupt:
        return
    except Exception:
        logger.exception("worker %d could not load the models in %s", os.getpid(), settings.models_dir)
        sys.exit(STARTUP_FAILURE)
    try:
        uvicorn.Server(uvicorn_config).run(sockets=[listener])
    except KeyboardInterrupt:
        pass


__all__ = [
    "ServerSettings",
    "ServerConfig",
    "create_app",
    "ModelRegistry",
    "RequestGuard",
    "load_api_keys",
    "add_arguments",
    "run",
]
