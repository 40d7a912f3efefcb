"""Remove the folders Concrete compiles into once nothing uses them.

Every ``fhe.Compiler.compile`` and ``fhe.Server.load`` of concrete-python 2.11 writes the
circuit's shared library into a fresh ``tempfile.mkdtemp()`` folder, one per runtime
(simulation, execution), and ``Circuit.cleanup`` / ``Server.cleanup`` do nothing: each folder
stays in the temporary directory after the process ends. A precision search compiles dozens of
candidates, a server reloads artifacts, a test suite compiles thousands of circuits: the
folders add up to gigabytes and fill the disk (a CI run failed writing keys to a full disk).

Each ``fhe.Server`` reads its folder on every run, so it must stay while the server lives. The
functions here tie each folder to the object that owns it, a circuit or a loaded server: the
folder is removed when that object is garbage-collected, or at interpreter exit. They reach into
Concrete's private attributes; if those change, nothing is removed and a debug line says so.
"""

from __future__ import annotations

import logging
import os
import shutil
import weakref
from typing import Any, List, TypeVar

logger = logging.getLogger("fhe_backend")

_TRACKED: "weakref.WeakSet[Any]" = weakref.WeakSet()
ServerT = TypeVar("ServerT")


def remove_with_server(server: ServerT) -> ServerT:
    """Remove `server`'s library folder when `server` is collected (or at exit); returns it."""
    if server in _TRACKED:
        return server
    try:
        folder = server._library.get_output_dir_path()  # type: ignore[attr-defined] # noqa: SLF001
    except AttributeError as error:
        logger.debug("fhe_backend: cannot find the folder of a Concrete server (%s); it stays", error)
        return server
    remove_with(server, folder)
    _TRACKED.add(server)
    return server


def remove_with(owner: object, folder: Any) -> None:
    """Remove `folder` when `owner` is garbage-collected, or at exit (in this process only)."""
    weakref.finalize(owner, _remove, os.getpid(), str(folder))


def remove_with_circuit(circuit: Any) -> None:
    """Remove the folders of `circuit`'s runtimes (simulation, execution) when `circuit` is
    collected (or at exit), including runtimes it starts later (Concrete starts one lazily,
    when a statistic or keys are first asked for)."""
    if circuit in _TRACKED:
        return
    module = getattr(circuit, "_module", None)
    runtimes = [getattr(module, name, None) for name in ("simulation_runtime", "execution_runtime")]
    if None in runtimes:
        logger.debug("fhe_backend: cannot find the runtimes of a Concrete circuit; their folders stay")
        return
    weakref.finalize(circuit, _remove_started, os.getpid(), runtimes)
    _TRACKED.add(circuit)


def _remove(owner_pid: int, folder: str) -> None:
    """Remove `folder`, unless this is a forked child exiting (the folder is its parent's)."""
    if os.getpid() == owner_pid:
        shutil.rmtree(folder, ignore_errors=True)


def _remove_started(owner_pid: int, runtimes: List[Any]) -> None:
    for lazy in runtimes:
        try:
            folder = lazy.val.server._library.get_output_dir_path() if lazy.initialized else None  # noqa: SLF001
        except AttributeError as error:
            logger.debug("fhe_backend: cannot find the folder of a Concrete runtime (%s); it stays", error)
            continue
        if folder is not None:
            _remove(owner_pid, folder)
