"""Remove the folders Concrete compiles into once nothing uses them.

Every ``fhe.Compiler.compile`` and ``fhe.Server.load`` of concrete-python 2.11 writes the
circuit's shared library into a fresh ``tempfile.mkdtemp()`` folder, one per runtime
(simulation, execution), and ``Circuit.cleanup`` / ``Server.cleanup`` do nothing: each folder
stays in the temporary directory after the process ends. A precision search compiles dozens of
candidates, a server reloads artifacts, a test suite compiles thousands of circuits: the
folders add up to gigabytes and fill the disk (a CI run failed writing keys to a full disk).

Each ``fhe.Server`` reads its folder on every run, so it must stay while the server lives. The
functions here tie each folder to its server object: the folder is removed when the server is
garbage-collected, or at interpreter exit for servers still alive then. They reach into
Concrete's private attributes; if those change, nothing is removed and a debug line says so.
"""

from __future__ import annotations

import logging
import shutil
import weakref
from typing import Any, TypeVar

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
    weakref.finalize(server, shutil.rmtree, folder, ignore_errors=True)
    _TRACKED.add(server)
    return server


def remove_with_circuit(circuit: Any) -> None:
    """Tie the folder of each runtime `circuit` has started (simulation, execution) to it."""
    for runtime in ("simulation_runtime", "execution_runtime"):
        lazy = getattr(getattr(circuit, "_module", None), runtime, None)
        if lazy is not None and lazy.initialized:
            remove_with_server(lazy.val.server)
