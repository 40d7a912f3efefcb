"""Encrypted batches on a Ray cluster: ``options={"runner": "ray"}`` and `run_server_on_ray`.

`RayExecutor` is the ``ray`` runner of `fhe_backend.circuit_runner` (importing this module
registers it). For a batch in ``fhe="execute"`` it

1. encrypts every sample here, in the client process (private keys never leave it);
2. puts the circuit's server side (Concrete's compiled server archive) and the evaluation keys
   into Ray's object store, once per circuit and key set (later batches reuse them);
3. evaluates the samples on a pool of `CircuitWorker` actors, one CPU each, which load a circuit
   and deserialize its evaluation keys once and keep them for later samples (Ray's object store
   brings them to each node once);
4. decrypts the results here, in sample order. Results equal the local runner's exactly: the
   same circuit evaluated on the same ciphertexts.

Ray is connected on first use: the cluster of ``RAY_ADDRESS`` (e.g. ``auto`` or
``ray://head:10001``) when set, else a local instance. `configure` sets the number of workers
and the CPUs each reserves. `run_server_on_ray` does the same for the server side alone
(`FHEModelServer.run` on many ciphertexts): serialized ciphertexts and evaluation keys in,
serialized results out.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

from ..circuit_runner import Sample, register_executor
from ..errors import FheBackendError
from ..output_dirs import locked_folder, remove_with, remove_with_server
from ..process_executor import decrypt_serialized, encrypt_serialized
from ..process_worker import SerializedSample
from .ray_serve import connect, require_ray

WORKER_CACHE = 4  # circuits and key sets one worker keeps loaded
WORKER_START_SECONDS = 300  # a new worker imports torch and Concrete


class RayWorkersUnavailable(FheBackendError, RuntimeError):
    """The ``ray`` runner's workers could not be placed on the cluster (no free CPUs)."""


@dataclass
class RayRunnerSettings:
    """How many `CircuitWorker` actors run samples and what each reserves.

    workers: actors in the pool (default: the cluster's CPUs divided by `cpus_per_worker`).
    cpus_per_worker: CPUs Ray reserves per actor (Concrete's runtime may use more threads).
    address: the Ray cluster to connect to when this process is not connected yet (default
    ``RAY_ADDRESS``, else a new local instance).
    """

    workers: Optional[int] = None
    cpus_per_worker: float = 1.0
    address: Optional[str] = None


_SETTINGS = RayRunnerSettings()


def configure(
    workers: Optional[int] = None, cpus_per_worker: float = 1.0, address: Optional[str] = None
) -> None:
    """Set the pool used by the ``ray`` runner from now on (an existing pool is replaced)."""
    global _SETTINGS
    _SETTINGS = RayRunnerSettings(workers, cpus_per_worker, address)
    shutdown_workers()


class CircuitWorker:
    """The body of a worker actor: Concrete servers and evaluation keys by content digest.

    `run` receives object references wrapped in lists (so Ray does not fetch them for every
    call) and fetches a circuit or key set only the first time it sees its digest.
    """

    def __init__(self) -> None:
        self.servers: "OrderedDict[str, Any]" = OrderedDict()
        self.keys: "OrderedDict[str, Any]" = OrderedDict()
        # the actor's process is its own: Concrete unpacks the circuits it loads in its folder
        # too, removed by a later worker if Ray kills this one (`locked_folder`)
        folder, self._lock_descriptor = locked_folder("fhe_ray_worker_")
        self.folder = tempfile.tempdir = str(folder)
        remove_with(self, self.folder)

    def run(
        self,
        server: Tuple[str, List[Any]],
        keys: Tuple[str, List[Any]],
        samples: Sequence[SerializedSample],
    ) -> List[SerializedSample]:
        """Evaluate serialized samples with the circuit and keys named by (digest, [object ref])."""
        import ray
        from concrete import fhe

        server_digest, (server_ref,) = server
        keys_digest, (keys_ref,) = keys
        if server_digest not in self.servers:
            path = Path(self.folder) / f"{server_digest}.zip"
            path.write_bytes(ray.get(server_ref))
            self.servers[server_digest] = remove_with_server(fhe.Server.load(path))
            _trim(self.servers)
        if keys_digest not in self.keys:
            self.keys[keys_digest] = fhe.EvaluationKeys.deserialize(ray.get(keys_ref))
            _trim(self.keys)
        self.servers.move_to_end(server_digest)
        self.keys.move_to_end(keys_digest)
        circuit, evaluation_keys = self.servers[server_digest], self.keys[keys_digest]
        outputs = []
        for sample in samples:
            result = circuit.run(*[fhe.Value.deserialize(v) for v in sample], evaluation_keys=evaluation_keys)
            outputs.append(tuple(r.serialize() for r in (result if isinstance(result, tuple) else (result,))))
        return outputs

    def pid(self) -> int:
        """The actor's process id (tests kill workers by it)."""
        return os.getpid()


def _trim(cache: "OrderedDict[str, Any]") -> None:
    while len(cache) > WORKER_CACHE:
        cache.popitem(last=False)


class _Pool:
    """The worker actors of this process, for one Ray connection."""

    def __init__(self, settings: RayRunnerSettings) -> None:
        ray = require_ray("the ray runner")
        if not ray.is_initialized():
            connect(settings.address)  # else RAY_ADDRESS, else a local instance
        self.job = ray.get_runtime_context().get_job_id()
        count = settings.workers or max(
            1, int(ray.cluster_resources().get("CPU", 1) // max(settings.cpus_per_worker, 1e-3))
        )
        # a call running on a worker that dies is run again on its restarted process (evaluation
        # is a pure function of the ciphertexts and keys)
        # the worker class travels by value: a worker process imports Concrete, not this package
        # (and torch with it), which halves its start-up
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        actor = ray.remote(CircuitWorker).options(
            num_cpus=settings.cpus_per_worker, max_restarts=2, max_task_retries=2
        )
        self.actors = [actor.remote() for _ in range(count)]
        # a worker Ray cannot place (every CPU reserved) would make a batch wait forever
        ready, _ = ray.wait(
            [a.pid.remote() for a in self.actors], num_returns=count, timeout=WORKER_START_SECONDS
        )
        if len(ready) < count:
            for handle in self.actors:
                ray.kill(handle)
            raise RayWorkersUnavailable(
                f"runner 'ray': {count - len(ready)} of {count} workers ({settings.cpus_per_worker:g} CPU each) "
                f"did not start within {WORKER_START_SECONDS} s; the cluster has "
                f"{ray.available_resources().get('CPU', 0):g} CPUs free of {ray.cluster_resources().get('CPU', 0):g}: "
                "add nodes, or ray_runner.configure(workers=..., cpus_per_worker=...) with fewer"
            )

    def valid(self) -> bool:
        ray = require_ray("the ray runner")
        return ray.is_initialized() and ray.get_runtime_context().get_job_id() == self.job

    def run(
        self, server: Tuple[str, List[Any]], keys: Tuple[str, List[Any]], samples: Sequence[SerializedSample]
    ) -> List[SerializedSample]:
        """Spread the samples over the actors, one sample per call, idle actors first."""
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        results = pool.map(lambda actor, sample: actor.run.remote(server, keys, [sample]), samples)
        return [outputs[0] for outputs in results]


_POOL: Optional[_Pool] = None
_POOL_LOCK = threading.Lock()


def worker_pool() -> _Pool:
    """The pool of `CircuitWorker` actors (created on first use, again after Ray restarted)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or not _POOL.valid():
            _POOL = _Pool(_SETTINGS)
        return _POOL


def shutdown_workers() -> None:
    """Kill the worker actors of this process (the next batch starts new ones)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL.valid():
            ray = require_ray("the ray runner")
            for actor in _POOL.actors:
                ray.kill(actor)
        _POOL = None


def _shipped(data: bytes) -> Tuple[str, List[Any]]:
    """(content digest, [object ref]) of bytes put into Ray's object store."""
    import hashlib

    ray = require_ray("the ray runner")
    return hashlib.sha256(data).hexdigest()[:24], [ray.put(data)]


class RayExecutor:
    """The ``ray`` runner: encrypt here, evaluate on Ray actors, decrypt here (see the module doc)."""

    # circuit -> (the key set object shipped, shipped server, shipped evaluation keys, job id)
    _cache: "weakref.WeakKeyDictionary[Any, Tuple[Any, Any, Any, str]]" = weakref.WeakKeyDictionary()

    def execute(self, circuit: Any, samples: Sequence[Sample]) -> List[Sample]:
        """Encrypted outputs of `circuit` on each sample, evaluated on the cluster; sample order."""
        if not samples:
            return []
        pool = worker_pool()
        server, keys = self._ship(circuit, pool)
        encrypted = [encrypt_serialized(circuit, sample) for sample in samples]
        results = pool.run(server, keys, encrypted)
        return [decrypt_serialized(circuit, result) for result in results]

    def _ship(self, circuit: Any, pool: _Pool) -> Tuple[Any, Any]:
        """The circuit's server archive and evaluation keys in the object store, once per key set."""
        keyset = getattr(circuit.keys, "_keyset", None)
        cached = self._cache.get(circuit)
        if cached is not None and keyset is not None and cached[0] is keyset and cached[3] == pool.job:
            return cached[1], cached[2]
        with tempfile.TemporaryDirectory(prefix="fhe_ray_circuit_") as folder:
            path = Path(folder) / "server.zip"
            circuit.server.save(path)  # the compiled library: the cluster runs this environment
            server = _shipped(path.read_bytes())
        keys = _shipped(circuit.keys.evaluation.serialize())
        self._cache[circuit] = (keyset, server, keys, pool.job)
        return server, keys


def run_server_on_ray(
    server_zip: Union[str, Path],
    serialized_inputs: Sequence[Union[bytes, SerializedSample]],
    evaluation_keys: bytes,
) -> List[Union[bytes, SerializedSample]]:
    """`FHEModelServer.run` for many ciphertexts, evaluated on the Ray worker pool.

    server_zip: a ``server.zip`` (`FHEModelDev`'s, or a module folder holding one);
    serialized_inputs: one entry per sample (``bytes``, or a tuple of them for several inputs);
    evaluation_keys: the client's serialized evaluation keys. Returns the serialized outputs in
    sample order, in the inputs' layout. Ciphertexts and keys are checked against the circuit's
    client specification first, as `FHEModelServer.run` does.
    """
    from .fhe_client_server import SERVER_ZIP, read_server_info

    path = Path(server_zip)
    folder = path if path.is_dir() else path.parent
    _, specs = read_server_info(folder)  # the circuit itself is loaded by the workers only
    checked = [item if isinstance(item, tuple) else (item,) for item in serialized_inputs]
    _check_inputs(folder, specs, checked, evaluation_keys)
    archive = (folder / SERVER_ZIP).read_bytes()
    results = worker_pool().run(_shipped(archive), _shipped(evaluation_keys), checked)
    return [r if isinstance(item, tuple) else r[0] for r, item in zip(results, serialized_inputs)]


def _check_inputs(
    folder: Path, specs_bytes: bytes, samples: List[SerializedSample], evaluation_keys: bytes
) -> None:
    """The wire checks `FHEModelServer.run` applies, before anything reaches a worker."""
    import json

    from .fhe_client_server import DeploymentError
    from .wire import WireFormatError, check_ciphertext, check_evaluation_keys

    specs = json.loads(specs_bytes)
    gates = specs["circuits"][0]["inputs"]
    try:
        check_evaluation_keys(evaluation_keys, specs)
        for index, sample in enumerate(samples):
            if len(sample) != len(gates):
                raise WireFormatError(
                    f"inputs[{index}]: {len(sample)} ciphertext(s), the circuit takes {len(gates)}"
                )
            for position, (value, gate) in enumerate(zip(sample, gates)):
                check_ciphertext(value, gate, f"inputs[{index}][{position}]")
    except WireFormatError as error:
        raise DeploymentError(f"{folder}: {error}") from None


register_executor("ray", RayExecutor)

__all__: List[str] = [
    "RayExecutor",
    "RayRunnerSettings",
    "RayWorkersUnavailable",
    "CircuitWorker",
    "configure",
    "worker_pool",
    "shutdown_workers",
    "run_server_on_ray",
]
