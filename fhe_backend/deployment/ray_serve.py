"""The FHE model server as a Ray Serve deployment: ``fhe-backend serve MODELS --engine ray``.

The same FastAPI application as the uvicorn engine (`fhe_backend.deployment.server.create_app`:
same endpoints, validation, limits and OpenAPI schema) runs in every replica of a Ray Serve
deployment. Ray spreads the replicas over the cluster's nodes, scales their number on ongoing
requests (``--min-replicas``/``--max-replicas``), health-checks them and replaces the ones that
die; Ray's HTTP proxy on each node routes any request to any replica (no stickiness needed).

Keys must be visible to every replica on every node. Two key stores implement `KeyStore`:

* ``--key-store folder``: the `FolderKeyStore` of ``--keys-dir``, which must then be one shared
  file system mounted at the same path on every node (NFS, a cloud volume);
* ``--key-store ray`` (the default): `RayKeyStore`, a named detached actor (`KeyStoreHost`)
  pinned to the head node that keeps the keys in a `FolderKeyStore` of ``--keys-dir`` on the
  head node's disk; it survives replica restarts and server restarts, and is restarted by Ray
  (same folder, same keys) when it dies. Replicas fetch keys from it through Ray's object store.

The models folder (MODELS) must be readable at the same path on every node that runs a replica.

Ray is optional: it is imported only here, only when used; without it the error says
``pip install 'fhe-backend[ray]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import hashlib
import logging
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from ..errors import FheBackendError
from .keystore import (
    FolderKeyStore,
    KeyQuota,
    KeyRecord,
    KeyStore,
    KeyStoreError,
    KeyStoreUnavailable,
    QuarantinedKey,
    QuotaExceeded,
    UnknownKey,
)

logger = logging.getLogger("fhe_backend.server")

INSTALL_HINT = "pip install 'fhe-backend[ray]'"
KEY_STORE_NAMESPACE = "fhe_backend"
APP_NAME = "fhe_backend"
DEPLOYMENT_NAME = "FheModelServer"
KEY_STORE_TIMEOUT_SECONDS = 120.0  # one call of the key-store actor (a 200 MB key upload included)
HEAD_NODE_RESOURCE = "node:__internal_head__"


class RayNotInstalledError(FheBackendError, ImportError):
    """Ray (with Serve) is needed for ``--engine ray`` / ``runner="ray"`` but is not installed."""


def require_ray(feature: str = "the Ray engine") -> Any:
    """The `ray` module; `RayNotInstalledError` naming the install command when it is missing."""
    try:
        import ray
        import ray.serve  # noqa: F401  (Serve is part of the extra)
    except ImportError as error:
        raise RayNotInstalledError(
            f"{feature} needs Ray Serve, which is not installed ({error}): {INSTALL_HINT}"
        ) from error
    return ray


_local_scratch: Optional[str] = None  # the temporary folder of the local instance's workers


def connect(
    address: Optional[str] = None,
    num_cpus: Optional[int] = None,
    object_store_memory: Optional[int] = None,
) -> bool:
    """Connect to Ray: `address` (``auto``, ``ray://host:10001``, ``host:6379``), else the
    ``RAY_ADDRESS`` environment variable, else a new local Ray instance (no dashboard; never a
    cluster found on this machine). Returns whether this call connected (so the caller shuts the
    connection, and a local instance with it, down with `shutdown`); a process already connected
    keeps its connection.
    """
    ray = require_ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, namespace=KEY_STORE_NAMESPACE, log_to_driver=False)
        return True
    # a local instance: Ray's own ports use this machine's address; the HTTP proxy binds --host.
    # Its workers' temporary files go to one folder of ours: Ray kills workers and their children
    # (compute processes) at shutdown, before they can remove the folders they made there
    global _local_scratch
    _local_scratch = tempfile.mkdtemp(prefix="fhe_ray_session_")
    atexit.unregister(shutdown)  # once, however often a local instance is started
    atexit.register(shutdown)
    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=object_store_memory,
        include_dashboard=False,
        namespace=KEY_STORE_NAMESPACE,
        log_to_driver=False,
        runtime_env=_local_runtime_env(),
    )
    return True


def _local_runtime_env() -> Dict[str, Any]:
    """The runtime environment of a local instance's workers: its temporary folder."""
    return {"env_vars": {"TMPDIR": _local_scratch}}


def shutdown() -> None:
    """Disconnect from Ray (``ray.shutdown``); a local instance `connect` started stops with it,
    and its workers' temporary folder is removed. Also run at exit."""
    global _local_scratch
    ray = require_ray()
    ray.shutdown()
    if _local_scratch is not None:
        shutil.rmtree(_local_scratch, ignore_errors=True)
        _local_scratch = None


# ---- keys kept in Ray ---------------------------------------------------------------------------


class KeyStoreHost:
    """The body of the key-store actor: a `FolderKeyStore` on the head node's disk.

    Methods return ``("ok", value)`` or ``("error", kind, message, record)`` instead of raising,
    so that `RayKeyStore` raises the key-store error the application maps to HTTP (Ray would
    wrap exceptions with the actor's traceback).
    """

    def __init__(self, folder: str):
        self.store = FolderKeyStore(Path(folder))
        self.folder = folder

    def call(self, method: str, *args: Any) -> Tuple[Any, ...]:
        """Run one `KeyStore` method of the folder store."""
        if method not in _KEY_STORE_METHODS:
            return ("error", "KeyStoreUnavailable", f"unknown key-store method {method!r}", None)
        try:
            value = getattr(self.store, method)(*args)
            return ("ok", list(value) if method == "records" else value)
        except QuarantinedKey as error:
            return ("error", "QuarantinedKey", str(error), asdict(error.record))
        except KeyStoreError as error:
            return ("error", type(error).__name__, str(error), None)
        except OSError as error:
            return (
                "error",
                "KeyStoreUnavailable",
                f"the Ray key store cannot use {self.folder} on the head node ({error})",
                None,
            )

    def location(self) -> Dict[str, Any]:
        """Where the keys live: the node's id, the actor's process id and the folder."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "folder": self.folder}


_KEY_STORE_METHODS = frozenset(
    {"check", "add", "record", "data", "delete", "quarantine", "records", "expire"}
)
_ERRORS = {cls.__name__: cls for cls in (UnknownKey, QuotaExceeded, KeyStoreUnavailable, KeyStoreError)}


def key_store_name(keys_dir: str) -> str:
    """The actor name of the Ray key store persisted in `keys_dir` (one store per folder)."""
    return "fhe_backend_keys_" + hashlib.sha256(str(keys_dir).encode()).hexdigest()[:16]


def start_key_store(keys_dir: str) -> "RayKeyStore":
    """Create (or find) the detached key-store actor for `keys_dir` on the head node.

    Needs a connected Ray. The actor restarts without limit (on the head node, reading the same
    folder) and outlives this process; ``ray.kill`` of ``RayKeyStore.handle()`` removes it.
    """
    ray = require_ray("the Ray key store")
    actor_class = ray.remote(KeyStoreHost)
    actor_class.options(
        name=key_store_name(keys_dir),
        namespace=KEY_STORE_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_concurrency=16,  # a large upload does not hold up reads
        num_cpus=0,
        resources={HEAD_NODE_RESOURCE: 0.001},  # the folder is on the head node
    ).remote(keys_dir)
    store = RayKeyStore(keys_dir)
    store.check()
    return store


class RayKeyStore(KeyStore):
    """`KeyStore` backed by the detached actor of `start_key_store` (see the module doc).

    Picklable: it holds the actor's name and finds the actor in each process that uses it.
    Calls that fail because the actor is restarting or does not answer raise
    `KeyStoreUnavailable` (the server answers 503, which clients retry).
    """

    def __init__(self, keys_dir: str, timeout_seconds: float = KEY_STORE_TIMEOUT_SECONDS):
        self.keys_dir = str(keys_dir)
        self.name = key_store_name(self.keys_dir)
        self.timeout_seconds = timeout_seconds
        self._handle: Any = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None}

    def handle(self) -> Any:
        """The actor handle (looked up by name on first use)."""
        if self._handle is None:
            ray = require_ray("the Ray key store")
            try:
                self._handle = ray.get_actor(self.name, namespace=KEY_STORE_NAMESPACE)
            except ValueError:
                raise KeyStoreUnavailable(
                    f"no Ray key store for keys folder {self.keys_dir} (actor {self.name} in namespace "
                    f"{KEY_STORE_NAMESPACE}): start the server with `fhe-backend serve --engine ray "
                    "--key-store ray`, which creates it"
                ) from None
        return self._handle

    def _call(self, method: str, *args: Any) -> Any:
        ray = require_ray("the Ray key store")
        try:
            reply = ray.get(self.handle().call.remote(method, *args), timeout=self.timeout_seconds)
        except ray.exceptions.GetTimeoutError:
            raise KeyStoreUnavailable(
                f"the Ray key store ({self.name}) did not answer {method} within {self.timeout_seconds:g} s: "
                "check the head node's load and the actor's log (ray logs)"
            ) from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as error:
            self._handle = None  # find the restarted actor next time
            raise KeyStoreUnavailable(
                f"the Ray key store ({self.name}) is unavailable ({type(error).__name__}); Ray restarts it "
                "on the head node with the keys of its folder: retry in a few seconds"
            ) from None
        if reply[0] == "ok":
            return reply[1]
        _, kind, message, record = reply
        if kind == "QuarantinedKey":
            raise QuarantinedKey(message, KeyRecord(**record))
        raise _ERRORS.get(kind, KeyStoreUnavailable)(message)

    def check(self) -> None:
        """The head node's folder is writable and the actor answers."""
        self._call("check")

    def add(self, record: KeyRecord, data: bytes, quota: KeyQuota) -> None:
        """Send the keys to the actor, which writes them atomically under the quota."""
        self._call("add", record, data, quota)

    def record(self, key_id: str) -> KeyRecord:
        """The record of live keys (see `KeyStore.record`)."""
        return self._call("record", key_id)

    def data(self, key_id: str) -> bytes:
        """The serialized keys, through Ray's object store."""
        return self._call("data", key_id)

    def delete(self, key_id: str) -> None:
        """Remove keys (see `KeyStore.delete`)."""
        self._call("delete", key_id)

    def quarantine(self, key_id: str, reason: str) -> None:
        """Set keys aside for good (see `KeyStore.quarantine`)."""
        self._call("quarantine", key_id, reason)

    def records(self) -> Iterator[KeyRecord]:
        """Every stored record."""
        return iter(self._call("records"))

    def expire(self, now: Optional[float] = None) -> int:
        """Delete expired keys in one call of the actor."""
        return self._call("expire", now)


# ---- the deployment ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RayServeSettings:
    """How the application is deployed on Ray (the application's own limits are `ServerSettings`).

    replicas: a fixed number of replicas; or autoscaling between `min_replicas` and
    `max_replicas`, aiming at `target_ongoing_requests` per replica (default: the server's
    ``--max-concurrent-computes``, one compute process each).
    key_store: ``"ray"`` (`RayKeyStore`) or ``"folder"`` (`FolderKeyStore`, a shared file system).
    replica_cpus: CPUs Ray reserves per replica (its compute processes use them).
    max_ongoing_requests: requests one replica handles at once (Ray queues the rest).
    """

    replicas: Optional[int] = None
    min_replicas: Optional[int] = None
    max_replicas: Optional[int] = None
    target_ongoing_requests: Optional[float] = None
    key_store: str = "ray"
    replica_cpus: float = 1.0
    max_ongoing_requests: int = 16
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    proxy_location: str = "EveryNode"

    def __post_init__(self):
        if self.key_store not in ("ray", "folder"):
            raise ValueError(f"--key-store {self.key_store!r}: choose 'ray' or 'folder'")
        autoscaled = self.min_replicas is not None or self.max_replicas is not None
        if self.replicas is not None and autoscaled:
            raise ValueError(
                "--replicas N fixes the number of replicas; do not combine it with --min/--max-replicas"
            )
        low, high = self.min_replicas or 0, self.max_replicas
        if autoscaled and (high is None or high < 1 or low > high):
            raise ValueError(
                f"--min-replicas {self.min_replicas} --max-replicas {self.max_replicas}: give --max-replicas "
                ">= 1 and >= --min-replicas"
            )
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"--replicas {self.replicas}: at least 1")

    def deployment_options(self, settings: Any) -> Dict[str, Any]:
        """Keyword arguments of ``serve.deployment(...).options`` for these settings."""
        options: Dict[str, Any] = {
            "name": DEPLOYMENT_NAME,
            "max_ongoing_requests": max(self.max_ongoing_requests, settings.max_concurrent_computes),
            "max_queued_requests": settings.max_connections,  # 503 beyond, like uvicorn's limit
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": 60.0,  # the requests a stopping replica runs
            "ray_actor_options": {"num_cpus": self.replica_cpus},
        }
        if self.min_replicas is not None or self.max_replicas is not None:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas or 0,
                "initial_replicas": max(1, self.min_replicas or 0),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests or settings.max_concurrent_computes,
            }
        else:
            options["num_replicas"] = self.replicas or 1
        return options


class FheServeReplica:
    """One replica: `create_app(settings, keystore)` built in the replica, with Ray's health check.

    Wrapped with ``serve.ingress()`` by `build_application`; Serve calls
    ``__serve_build_asgi_app__`` once the replica starts and runs the app's lifespan (the compute
    processes start there), then routes every HTTP request of its route prefix to the app.
    """

    def __init__(self, settings: Any, keystore: KeyStore):
        self.settings, self.keystore = settings, keystore

    def __serve_build_asgi_app__(self):
        from .server import create_app

        return create_app(self.settings, self.keystore)

    async def check_health(self) -> None:
        """Ray's periodic health check: raises (and Ray replaces the replica) when keys cannot be
        read or stored, like ``GET /health`` answering 503."""
        await asyncio.to_thread(self.keystore.check)


def build_application(settings: Any, ray_settings: RayServeSettings) -> Any:
    """The Serve application (``serve.run`` it) serving `settings` with `ray_settings`.

    Needs a connected Ray; with the ``ray`` key store it starts (or finds) the key-store actor.
    """
    require_ray()
    from ray import serve

    keystore: KeyStore
    if ray_settings.key_store == "ray":
        keystore = start_key_store(settings.keys_dir)
    else:
        keystore = FolderKeyStore(Path(settings.keys_dir))
        keystore.check()
    options = ray_settings.deployment_options(settings)
    if _local_scratch is not None:  # Serve starts replicas without the job's runtime environment
        options["ray_actor_options"]["runtime_env"] = _local_runtime_env()
    deployment = serve.deployment(serve.ingress()(FheServeReplica))
    return deployment.options(**options).bind(settings, keystore)


def deploy(
    settings: Any,
    ray_settings: RayServeSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    route_prefix: str = "/",
) -> str:
    """Start Serve's HTTP proxies on `host`:`port` and deploy the application; returns its URL.

    Needs a connected Ray (`connect`). Returns once every initial replica answers.
    """
    require_ray()
    from ray import serve

    serve.start(
        proxy_location=ray_settings.proxy_location,
        http_options={"host": host, "port": port},
    )
    application = build_application(settings, ray_settings)
    serve.run(application, name=APP_NAME, route_prefix=route_prefix)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def replica_actor_names(app_name: str = APP_NAME) -> list:
    """Names of the application's replica actors (namespace ``serve``), e.g. to ``ray.kill`` one."""
    ray = require_ray()
    prefix = f"SERVE_REPLICA::{app_name}#{DEPLOYMENT_NAME}#"
    return sorted(
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == "serve" and actor["name"].startswith(prefix)
    )


# ---- the `fhe-backend serve --engine ray` options -------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fhe-backend serve --engine ray`` (importing Ray is not needed to list them)."""
    group = parser.add_argument_group("Ray engine (--engine ray; pip install 'fhe-backend[ray]')")
    group.add_argument(
        "--address",
        help="Ray cluster to deploy to: 'auto' (this node's cluster), 'ray://HEAD:10001' (Ray client) "
        "or 'HEAD:6379'; default: RAY_ADDRESS when set, else a new local Ray instance",
    )
    scale = group.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, help="a fixed number of replicas (default 1)")
    scale.add_argument("--min-replicas", type=int, help="autoscaling: fewest replicas (with --max-replicas)")
    group.add_argument("--max-replicas", type=int, help="autoscaling: most replicas")
    group.add_argument(
        "--target-ongoing-requests",
        type=float,
        help="autoscaling: ongoing requests per replica to aim at (default --max-concurrent-computes)",
    )
    group.add_argument(
        "--key-store",
        choices=("ray", "folder"),
        default="ray",
        help="'ray': keys kept by a detached actor on the head node, persisted in --keys-dir there "
        "(no shared file system needed); 'folder': --keys-dir is a shared file system mounted on every "
        "node (default ray)",
    )
    group.add_argument(
        "--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica (default 1)"
    )
    group.add_argument(
        "--ray-num-cpus", type=int, help="CPUs of the local Ray instance started without --address"
    )
    group.add_argument(
        "--detach",
        action="store_true",
        help="with --address: deploy and exit, leaving the application on the cluster "
        "(remove it with `serve shutdown` or `ray stop`)",
    )


def ray_settings_from_args(args: argparse.Namespace) -> RayServeSettings:
    """The `RayServeSettings` of parsed ``fhe-backend serve`` arguments."""
    return RayServeSettings(
        replicas=args.replicas,
        # --max-replicas alone autoscales from one replica (zero would make the first request wait)
        min_replicas=1 if args.min_replicas is None and args.max_replicas is not None else args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        key_store=args.key_store,
        replica_cpus=args.replica_cpus,
    )


def run(args: argparse.Namespace, settings: Any = None) -> int:
    """``fhe-backend serve --engine ray``: deploy, then serve until SIGINT/SIGTERM (or `--detach`).

    `args`: the parsed options of ``fhe-backend serve`` (`serve_command.add_arguments`);
    `settings`: the application's `ServerSettings` (default: built from `args`).
    """
    if not Path(args.models_dir).is_dir():
        print(f"fhe-backend serve: MODELS_DIR {args.models_dir} is not a folder")
        return 2
    if settings is None:
        from .server import settings_from_args

        settings = settings_from_args(args)
    if args.workers and args.workers > 1:
        print("fhe-backend serve: --workers is the uvicorn engine's; with --engine ray use --replicas")
        return 2
    if args.ssl_keyfile or args.ssl_certfile:
        print(
            "fhe-backend serve: --ssl-keyfile/--ssl-certfile apply to the uvicorn engine; with --engine ray "
            "terminate TLS in a proxy or load balancer in front of Ray's HTTP proxies"
        )
        return 2
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    if args.detach and not address:
        print("fhe-backend serve: --detach needs --address (a local Ray instance ends with the command)")
        return 2
    try:
        ray_settings = ray_settings_from_args(args)
    except ValueError as error:
        print(f"fhe-backend serve: {error}")
        return 2
    if settings.api_keys_file:  # read again by every replica: the same path on every node
        from .server import load_api_keys

        try:
            load_api_keys(settings.api_keys_file)
        except ValueError as error:
            print(f"fhe-backend serve: {error}")
            return 1
    started = connect(address, num_cpus=args.ray_num_cpus)
    from ray import serve

    stop = threading.Event()
    try:
        try:
            url = deploy(settings, ray_settings, args.host, args.port)
        except RuntimeError as error:  # Serve's "Deploying application ... failed"
            print(
                f"fhe-backend serve: the Ray Serve deployment failed ({error}); each replica's error is "
                "in the Ray session's logs/serve/replica_*.log on its node (/tmp/ray/session_latest)"
            )
            return 1
        print(f"fhe-backend serve: Ray Serve application '{APP_NAME}' ready at {url}", flush=True)
        if args.detach:
            return 0
        _on_signals(lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
        if address:  # the cluster stays up: take the application off it
            remover = threading.Thread(target=serve.delete, args=(APP_NAME,), daemon=True)
            remover.start()
            remover.join(60)
            if remover.is_alive():
                print(
                    f"fhe-backend serve: the cluster did not remove '{APP_NAME}' within 60 s: `serve shutdown`"
                )
    finally:
        if started and not args.detach:
            # a local instance stops with everything on it (a signal to the whole process group,
            # Ctrl-C in a terminal, reaches Ray's own processes too: no Serve call could finish)
            shutdown()
    return 0


def _on_signals(handler: Callable[..., None]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


__all__ = [
    "RayNotInstalledError",
    "RayKeyStore",
    "RayServeSettings",
    "FheServeReplica",
    "KeyStoreHost",
    "require_ray",
    "connect",
    "start_key_store",
    "build_application",
    "deploy",
    "replica_actor_names",
    "add_arguments",
    "run",
]
