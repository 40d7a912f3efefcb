"""Computations in supervised child processes, so that a native crash costs one request.

Concrete runs circuits in native code; input it does not expect (keys whose parameters differ
from the circuit's, say) can abort the whole process (SIGSEGV, SIGABRT, a Rust panic). The
server checks keys and ciphertexts before use (`fhe_backend.deployment.wire`), and runs every
computation in a `ComputeProcess`, a child of the worker: when the child dies, the request
that was running fails with `ComputeCrashed`, the worker lives on and starts a new child.

The child is a plain Python process running this file as a script (``python -I compute.py FD
SCRATCH``, SCRATCH its temporary folder):
it imports Concrete only (not torch nor this package), talks over a socket pair with
`multiprocessing.connection`, and exits when the worker closes its end.

A `ComputePool` holds at most `size` children, one computation each at a time: the pool size
is the worker's limit of concurrent computations (`try_acquire` returns None when all are
busy; the server answers 503 with ``Retry-After``). Each child keeps the circuits it loaded and
a cache of deserialized evaluation keys bounded in count and bytes; the parent decides what
the child caches, so `cached_keys()` reports it without asking the child.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections import OrderedDict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

logger = logging.getLogger("fhe_backend.server")

SERVER_ZIP = "server.zip"


class ComputeError(Exception):
    """A computation failed inside Concrete with an error (not a crash); `kind` says whose input."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # "keys": the evaluation keys; "inputs": the ciphertexts; "circuit": the server's


class ComputeCrashed(Exception):
    """The child process died during a computation (`exitcode`: negative for a signal)."""

    def __init__(self, exitcode: Optional[int]):
        described = (
            f"signal {signal.Signals(-exitcode).name}"
            if exitcode is not None and exitcode < 0 and -exitcode in signal.Signals._value2member_map_
            else f"exit code {exitcode}"
        )
        super().__init__(f"the computation process died ({described})")
        self.exitcode = exitcode


class ComputeProcess:
    """One child process running circuits; calls are serialized (one computation at a time)."""

    def __init__(self, cache_keys: int, cache_bytes: int):
        self.cache_keys, self.cache_bytes = max(1, cache_keys), max(0, cache_bytes)
        self.cached: "OrderedDict[str, int]" = OrderedDict()  # key id -> serialized bytes, LRU order
        self.process: Optional[subprocess.Popen] = None
        self.connection: Optional[Connection] = None
        self._evictions: List[str] = []  # forgotten keys the child still holds
        self._lock = threading.Lock()  # `forget` comes from other threads than `run`
        self._preload: List[str] = []
        self.scratch: Optional[Path] = None  # the child's temporary folder
        self._scratch_lock: Optional[int] = None  # holds it locked (`locked_folder`)

    def _remove_scratch(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            os.close(self._scratch_lock)
            self.scratch = self._scratch_lock = None

    def start(self) -> None:
        """Start (or restart) the child: its temporary folder is one removed when it stops
        (Concrete never removes the folders it unpacks circuits into, `fhe_backend.output_dirs`),
        or by a later compute process when both were killed."""
        # here, not at the top: the child runs this file and imports Concrete alone
        from fhe_backend.output_dirs import locked_folder
        from fhe_backend.process_executor import scratch_environment

        self._remove_scratch()  # a crashed child's circuits
        self.scratch, self._scratch_lock = locked_folder("fhe_compute_")
        parent_end, child_end = socket.socketpair()
        with child_end:
            self.process = subprocess.Popen(
                [sys.executable, "-I", __file__, str(child_end.fileno()), str(self.scratch)],
                pass_fds=(child_end.fileno(), self._scratch_lock),
                stdin=subprocess.DEVNULL,
                env=scratch_environment(self.scratch),
            )
        self.connection = Connection(parent_end.detach())
        with self._lock:
            self.cached.clear()
            self._evictions = []

    def alive(self) -> bool:
        """Whether the child runs."""
        return self.process is not None and self.process.poll() is None

    def run(
        self, circuit_dir: Path, key_id: str, load_keys: Callable[[], bytes], sample: Sequence[bytes]
    ) -> Tuple[bytes, ...]:
        """Run one sample; `load_keys` is called only when the child does not hold the keys.

        Raises `ComputeError` for an error Concrete reported, `ComputeCrashed` when the child
        died (it is restarted before this returns).
        """
        if not self.alive():
            self.start()
        data, evict = None, []
        with self._lock:
            cached = key_id in self.cached
            if cached:
                self.cached.move_to_end(key_id)
            evict, self._evictions = self._evictions, []
        if not cached:
            data = load_keys()
            with self._lock:
                evict += self._make_room(len(data))
        try:
            self.connection.send(("run", str(circuit_dir), key_id, data, evict, tuple(sample)))
            reply = self.connection.recv()
        except (EOFError, OSError):
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            crashed = ComputeCrashed(self.process.returncode)
            logger.error("compute process %d: %s; starting another", self.process.pid, crashed)
            self.start()
            self.preload(self._preload)
            raise crashed from None
        if data is not None and reply[:2] != ("error", "keys"):
            with self._lock:
                self.cached[key_id] = len(data)  # the child holds them now
        if reply[0] == "error":
            raise ComputeError(reply[1], reply[2])
        return reply[1]

    def forget(self, key_id: str) -> None:
        """Drop keys from the child's cache at its next call (deleted or quarantined keys)."""
        with self._lock:
            self.cached.pop(key_id, None)
            self._evictions.append(key_id)

    def _make_room(self, size: int) -> List[str]:
        evict = []
        while self.cached and (
            len(self.cached) + 1 > self.cache_keys or sum(self.cached.values()) + size > self.cache_bytes
        ):
            evict.append(self.cached.popitem(last=False)[0])
        return evict

    def preload(self, circuit_dirs: Sequence[Union[str, Path]]) -> None:
        """Ask the child to load circuits before its first computation (no reply expected)."""
        self._preload = [str(path) for path in circuit_dirs]
        if self._preload:
            self.connection.send(("load", self._preload))

    def evict_now(self) -> None:
        """Send pending evictions to an idle child at once (no reply expected)."""
        with self._lock:
            evict, self._evictions = self._evictions, []
        if evict and self.alive():
            try:
                self.connection.send(("evict", evict))
            except OSError:
                pass  # the child is gone; the next run restarts it

    def stop(self) -> None:
        """Stop the child (it exits when its end of the connection closes; killed after 5 s)."""
        if self.process is None:
            return
        self.connection.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._remove_scratch()


class ComputePool:
    """At most `size` compute processes of one worker, started on first use."""

    def __init__(self, size: int, cache_keys: int, cache_bytes: int):
        self.size = max(1, size)
        self._idle: List[ComputeProcess] = []
        self._busy = 0
        self._all: List[ComputeProcess] = []
        self._lock = threading.Lock()
        self._cache = (cache_keys, cache_bytes)

    def try_acquire(self) -> Optional[ComputeProcess]:
        """An idle process (started when needed), or None when `size` computations run already."""
        with self._lock:
            if self._idle:
                process = self._idle.pop()
            elif len(self._all) < self.size:
                process = ComputeProcess(*self._cache)
                self._all.append(process)
            else:
                return None
            self._busy += 1
            return process

    def release(self, process: ComputeProcess) -> None:
        """Return a process taken with `try_acquire`."""
        with self._lock:
            self._busy -= 1
            self._idle.append(process)

    def start(self, circuit_dirs: Sequence[Path] = ()) -> None:
        """Start every process now, not at the first request: they import Concrete and load the
        circuits of `circuit_dirs` in the background (loading an MLIR archive compiles it)."""
        with self._lock:
            while len(self._all) < self.size:
                process = ComputeProcess(*self._cache)
                process.start()
                process.preload(circuit_dirs)
                self._all.append(process)
                self._idle.append(process)

    def forget(self, key_id: str) -> None:
        """Make every process drop `key_id` from its cache (idle ones at once)."""
        with self._lock:
            for process in self._all:
                if key_id in process.cached:
                    process.forget(key_id)
                    if process in self._idle:
                        process.evict_now()

    def stats(self) -> Dict[str, int]:
        """Busy computations and the keys cached in the children (for ``GET /health``)."""
        with self._lock:
            return {
                "max_concurrent_computes": self.size,
                "running_computes": self._busy,
                "cached_keys": sum(len(p.cached) for p in self._all),
                "cached_key_bytes": sum(sum(p.cached.values()) for p in self._all),
            }

    def stop(self) -> None:
        """Stop every child."""
        with self._lock:
            for process in self._all:
                process.stop()


def _end_on_sigterm(signum: int, _frame: Any) -> None:
    """The child on SIGTERM (a whole process group stopped, the worker perhaps before it could
    stop its children): remove its temporary folder, then die of the signal as before."""
    shutil.rmtree(sys.argv[2], ignore_errors=True)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _child_main(connection) -> None:
    """The child: load circuits and keys, run samples, until the parent closes the pipe."""
    from concrete import fhe

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the worker, which closes the pipe
    signal.signal(signal.SIGTERM, _end_on_sigterm)
    servers: Dict[str, Any] = {}
    keys: Dict[str, Any] = {}
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message[0] == "load":
            for circuit_dir in message[1]:
                try:
                    if circuit_dir not in servers:
                        servers[circuit_dir] = fhe.Server.load(Path(circuit_dir) / SERVER_ZIP)
                except (RuntimeError, ValueError, OSError):
                    pass  # reported by the first computation that needs it
            continue
        if message[0] == "evict":
            for old in message[1]:
                keys.pop(old, None)
            _release_memory()
            continue
        _, circuit_dir, key_id, data, evict, sample = message
        for old in evict:
            keys.pop(old, None)
        if evict:
            _release_memory()
        try:
            if data is not None:
                keys[key_id] = fhe.EvaluationKeys.deserialize(data)
                del data
            elif key_id not in keys:
                connection.send(
                    ("error", "circuit", "internal: keys expected in the compute cache are missing")
                )
                continue
        except (RuntimeError, ValueError) as error:
            connection.send(("error", "keys", _first_line(error)))
            continue
        try:
            if circuit_dir not in servers:
                servers[circuit_dir] = fhe.Server.load(Path(circuit_dir) / SERVER_ZIP)
        except (RuntimeError, ValueError, OSError) as error:
            connection.send(("error", "circuit", _first_line(error)))
            continue
        try:
            values = [fhe.Value.deserialize(value) for value in sample]
            result = servers[circuit_dir].run(*values, evaluation_keys=keys[key_id])
        except (RuntimeError, ValueError) as error:
            connection.send(("error", "inputs", _first_line(error)))
            continue
        results = result if isinstance(result, tuple) else (result,)
        connection.send(("ok", tuple(r.serialize() for r in results)))


def _release_memory() -> None:
    """Give freed heap pages back to the system (glibc keeps them otherwise: evicted keys of
    hundreds of MB stayed resident)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return " ".join(text.splitlines()[:3])[:500]


__all__ = ["ComputePool", "ComputeProcess", "ComputeError", "ComputeCrashed"]

if __name__ == "__main__":  # the child: python -I compute.py FD SCRATCH
    try:
        _child_main(Connection(int(sys.argv[1])))
    finally:  # its temporary folder, also when the parent was killed (it removes it otherwise)
        shutil.rmtree(sys.argv[2], ignore_errors=True)
