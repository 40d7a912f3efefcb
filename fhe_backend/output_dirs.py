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

A process killed outright (SIGKILL: Ray kills a replica or worker actor and its children, the
kernel's OOM killer) runs no finalizer. Processes that may die so (compute processes, Ray
workers, runner workers) therefore work in a `locked_folder`: a temporary folder held locked
(``flock``) while any of its processes lives. The kernel drops the lock when the last of them
dies, however it dies; the next `locked_folder` of the same kind on the machine removes the
folders nobody holds any more.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import stat
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, List, Tuple, TypeVar

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


# a folder younger than this is not removed unlocked: its owner may not have locked it yet
ABANDONED_AFTER_SECONDS = 60.0


def locked_folder(prefix: str) -> Tuple[Path, int]:
    """A new temporary folder ``<prefix>XXXX`` (mode 700) and a descriptor that holds it
    locked: keep the descriptor open while the folder is in use (children share the lock when
    given it with ``pass_fds``), remove the folder and close it when done. First removes the
    folders ``<prefix>*`` of this user that no process holds any more (`remove_abandoned`)."""
    remove_abandoned(prefix)
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    return folder, descriptor


def held(folder: Path) -> bool:
    """Whether a process holds `folder`'s `locked_folder` lock (True for a folder this process
    cannot open: not ours to remove)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(descriptor)  # also drops the lock just taken; nobody takes a stale one again
    return False


def remove_abandoned(prefix: str, older_than: float = ABANDONED_AFTER_SECONDS) -> List[Path]:
    """Remove the temporary folders ``<prefix>*`` of this user whose `locked_folder` lock no
    process holds (their owners were killed before they could remove them) and that were last
    changed more than `older_than` seconds ago; returns them."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            status = folder.lstat()  # a symbolic link is not a directory here
        except OSError:
            continue  # removed meanwhile
        if (
            not stat.S_ISDIR(status.st_mode)
            or status.st_uid != os.getuid()
            or time.time() - status.st_mtime < older_than
            or held(folder)
        ):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("fhe_backend: removed %s, left by a process that was killed", folder)
        removed.append(folder)
    return removed


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
