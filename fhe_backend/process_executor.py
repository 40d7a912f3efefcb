"""Encrypted batches on every core: the ``processes`` runner (``auto`` on a multi-core machine).

Threads overlap Concrete's evaluations only in part (measured on 2 cores, a batch of 8 tiny
samples: 1.0 to 1.96 cores busy from run to run, the rest of each sample holds the GIL);
`ProcessExecutor` evaluates samples side by side in worker processes (1.97-1.98 cores busy,
the lowest wall time), which makes it the default on a machine with several cores:

1. every sample is encrypted here, in the client process (private keys never leave it), and
   serialized;
2. the circuit's server archive and its evaluation keys are written once per circuit and key set
   to a private temporary folder (mode 700), which the workers read by content digest (a
   worker loads a circuit or key set the first time it sees it and keeps a few);
3. the samples are split into one contiguous chunk per worker; the serialized results come back
   and are decrypted here, in sample order. Results equal the sequential runner's exactly: the
   same circuit evaluated on the same ciphertexts.

Workers are ``python fhe_backend/process_worker.py`` subprocesses (`fhe_backend.process_worker`):
they import Concrete only, never the user's script (so no ``if __name__ == "__main__"`` guard
is needed, unlike multiprocessing's spawn), start on first use (about a second) and live until
the process exits or `shutdown` is called. A worker that dies is reported with its exit status
and replaced at the next batch.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from .errors import FheBackendError
from .graph_utils import as_tuple
from .output_dirs import locked_folder
from .process_worker import SerializedSample

WORKER_SCRIPT = Path(__file__).with_name("process_worker.py")


class ExecutorWorkerDied(FheBackendError, RuntimeError):
    """A worker process of the ``processes`` runner died or failed while evaluating samples."""


def encrypt_serialized(circuit: Any, sample: Sequence[Any]) -> SerializedSample:
    """One sample encrypted with the circuit's keys (here) and serialized."""
    return tuple(v.serialize() for v in as_tuple(circuit.encrypt(*sample)))


def decrypt_serialized(circuit: Any, serialized: SerializedSample) -> Tuple[Any, ...]:
    """Serialized encrypted outputs decrypted with the circuit's keys (here)."""
    from concrete import fhe

    return as_tuple(circuit.decrypt(*[fhe.Value.deserialize(v) for v in serialized]))


@contextlib.contextmanager
def _sigpipe_blocked() -> Iterator[None]:
    """Writes to a dead worker fail with BrokenPipeError instead of a SIGPIPE: Concrete's
    dataflow runtime (HPX), once started, handles SIGPIPE by ending the whole process."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
    try:
        yield
    finally:
        signal.sigtimedwait([signal.SIGPIPE], 0)  # drop the SIGPIPE a failed write left pending
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def scratch_environment(scratch: Path) -> dict:
    """This process's environment with `scratch` as the temporary folder: a child's Concrete
    unpacks every circuit it loads into a folder it never removes (`fhe_backend.output_dirs`),
    so children get a folder their parent removes when it stops them."""
    return {**os.environ, "TMPDIR": str(scratch)}


class _Worker:
    """One worker subprocess, spoken to by pickled messages on its standard input and output."""

    def __init__(self, scratch: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=scratch_environment(scratch),
        )

    def send(self, request: Any) -> None:
        """Write one request (the answer is read by `receive`)."""
        try:
            with _sigpipe_blocked():
                pickle.dump(request, self.process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                self.process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise self._died(error) from error

    def receive(self) -> List[SerializedSample]:
        """The answer to the last request; a failure there raises ExecutorWorkerDied."""
        try:
            status, payload = pickle.load(self.process.stdout)
        except (EOFError, OSError, pickle.UnpicklingError) as error:
            raise self._died(error) from error
        if status != "ok":
            raise ExecutorWorkerDied(f"a 'processes' runner worker failed to evaluate samples: {payload}")
        return payload

    def alive(self) -> bool:
        """Whether the subprocess still runs."""
        return self.process.poll() is None

    def _died(self, error: BaseException) -> ExecutorWorkerDied:
        code = self.process.wait(timeout=10) if not self.alive() else None
        return ExecutorWorkerDied(
            f"a 'processes' runner worker (pid {self.process.pid}) died while evaluating samples "
            f"(exit status {code}, {type(error).__name__}); the next batch starts a new one. Its "
            "standard error above says why; runner='local' runs samples in this process"
        )

    def close(self) -> None:
        """Close its input (it exits) and wait for it."""
        try:
            self.process.stdin.close()
            self.process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()


class _Pool:
    """The worker subprocesses and the folder of circuits and keys they read."""

    def __init__(self, workers: int) -> None:
        # mode 700 (keys); removed by a later pool if this process is killed (`locked_folder`)
        self.folder, self._lock_descriptor = locked_folder("fhe_processes_")
        self.scratch = self.folder / "tmp"  # where the workers' Concrete unpacks circuits
        self.scratch.mkdir()
        self.workers: List[_Worker] = [_Worker(self.scratch) for _ in range(workers)]
        # circuit -> (key set shipped, (digest, server path), (digest, keys path))
        self.shipped: "weakref.WeakKeyDictionary[Any, Tuple[Any, Any, Any]]" = weakref.WeakKeyDictionary()
        self.lock = threading.Lock()  # one batch at a time on the workers

    def ship(self, circuit: Any) -> Tuple[Tuple[str, str], Tuple[str, str]]:
        """The circuit's server archive and evaluation keys on disk, once per key set."""
        keyset = getattr(circuit.keys, "_keyset", None)
        cached = self.shipped.get(circuit)
        if cached is not None and keyset is not None and cached[0] is keyset:
            return cached[1], cached[2]
        staging = self.folder / f"staging-{uuid.uuid4().hex}.zip"
        circuit.server.save(staging)
        server = self._stored(staging.read_bytes(), "zip", staging)
        keys = self._stored(circuit.keys.evaluation.serialize(), "keys")
        self.shipped[circuit] = (keyset, server, keys)
        return server, keys

    def _stored(self, data: bytes, suffix: str, staging: Optional[Path] = None) -> Tuple[str, str]:
        digest = hashlib.sha256(data).hexdigest()[:24]
        path = self.folder / f"{digest}.{suffix}"
        if staging is not None:
            staging.replace(path)
        elif not path.exists():
            path.write_bytes(data)
        return digest, str(path)

    def run(self, server: Any, keys: Any, chunks: List[List[SerializedSample]]) -> List[SerializedSample]:
        """Each chunk on its own worker (dead workers replaced first); outputs in chunk order."""
        with self.lock:
            self.workers = [w if w.alive() else _Worker(self.scratch) for w in self.workers]
            busy = self.workers[: len(chunks)]
            for worker, chunk in zip(busy, chunks):
                worker.send((server, keys, chunk))
            answers, failure = [], None
            for worker in busy:  # read every answer, so no worker is left mid-message
                try:
                    answers.extend(worker.receive())
                except ExecutorWorkerDied as error:
                    failure = failure or error
            if failure is not None:
                raise failure
            return answers

    def close(self) -> None:
        """Stop the workers and remove the folder."""
        for worker in self.workers:
            worker.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        os.close(self._lock_descriptor)


_POOL: Optional[_Pool] = None
_LOCK = threading.Lock()


def _pool(workers: int) -> _Pool:
    global _POOL
    with _LOCK:
        if _POOL is None or len(_POOL.workers) != workers:
            if _POOL is not None:
                _POOL.close()
            _POOL = _Pool(workers)
        return _POOL


def worker_cpu_seconds() -> float:
    """CPU seconds the live workers of the ``processes`` runner have used so far (Linux's
    /proc; 0.0 elsewhere or without workers): with this process's own CPU time, how many cores
    a batch kept busy."""
    pool, total = _POOL, 0.0
    for worker in pool.workers if pool is not None else []:
        try:
            fields = Path(f"/proc/{worker.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def shutdown() -> None:
    """Stop the worker processes of the ``processes`` runner (a later batch starts new ones)."""
    global _POOL
    with _LOCK:
        if _POOL is not None:
            _POOL.close()
            _POOL = None


atexit.register(shutdown)


class ProcessExecutor:
    """Samples side by side in `workers` processes (default: one per core), see the module doc."""

    def __init__(self, workers: Optional[int] = None):
        self.workers = workers or os.cpu_count() or 1

    def execute(self, circuit: Any, samples: Sequence[Sequence[Any]]) -> List[Tuple[Any, ...]]:
        """Encrypt here, evaluate in the workers, decrypt here; results in sample order."""
        if len(samples) < 2 or self.workers < 2:
            return [as_tuple(circuit.encrypt_run_decrypt(*sample)) for sample in samples]
        pool = _pool(self.workers)
        server, keys = pool.ship(circuit)
        encrypted = [encrypt_serialized(circuit, sample) for sample in samples]
        count = min(self.workers, len(encrypted))
        bounds = [len(encrypted) * i // count for i in range(count + 1)]
        outputs = pool.run(server, keys, [encrypted[start:end] for start, end in zip(bounds, bounds[1:])])
        return [decrypt_serialized(circuit, output) for output in outputs]
