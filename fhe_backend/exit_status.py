"""Keep the interpreter's exit status when concrete-python is loaded.

concrete-python (2.10, 2.11) registers an `atexit` callback that terminates its dataflow
runtime; once a circuit has been simulated or run, that runtime calls C's ``exit(0)`` from
inside the callback, so the process exits with status 0 whatever Python asked for
(``sys.exit(3)``, an uncaught exception, a failing pytest run). Importing `fhe_backend`
replaces that callback with one that terminates the dataflow runtime only when a circuit was
compiled with ``dataflow_parallelize=True`` (the only case where it holds threads to stop).
Without it, the runtime needs no shutdown and the exit status is the one Python chose.

With ``dataflow_parallelize=True`` Concrete's shutdown still forces status 0: end such a
script with `exit_now(status)`, which flushes the standard streams and exits with `status`
without running the shutdown.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import sys
import threading

from concrete import compiler as _concrete_compiler

_terminate_dataflow = _concrete_compiler._terminate_df_parallelization  # noqa: SLF001
_dataflow_used = False
_sigpipe_restored = False


def keep_python_sigpipe() -> None:
    """Give SIGPIPE back to Python once Concrete's dataflow runtime has taken it (idempotent).

    The runtime (HPX), started by the first simulation or encrypted run, handles SIGPIPE by
    printing its configuration and ending the process: a later write to a closed pipe or
    socket (``script | head``, a client gone away from a web server) killed the program. Python
    ignores SIGPIPE, so such writes raise BrokenPipeError; this puts that back. Only the main
    thread may set a handler through `signal`; from another thread (a web server running
    inference in its thread pool) the C library's ``signal`` sets the same SIG_IGN that Python
    set at startup and still records.
    """
    global _sigpipe_restored  # noqa: PLW0603 - one flag for the process, like the handler
    if _sigpipe_restored or not hasattr(signal, "SIGPIPE"):
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
        if libc.signal(signal.SIGPIPE, int(signal.SIG_IGN)) == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), "fhe_backend: could not ignore SIGPIPE again")
    _sigpipe_restored = True


def keep_exit_status() -> None:
    """Replace concrete-python's exit callback with one that keeps the exit status (idempotent)."""
    atexit.unregister(_terminate_dataflow)
    atexit.unregister(_terminate_dataflow_if_used)
    atexit.register(_terminate_dataflow_if_used)


def note_configuration(configuration: object) -> None:
    """Record that a circuit uses Concrete's dataflow runtime, which must be stopped at exit."""
    global _dataflow_used  # noqa: PLW0603 - one flag for the process, like the runtime itself
    if getattr(configuration, "dataflow_parallelize", False):
        _dataflow_used = True


def exit_now(status: int = 0) -> None:
    """Flush stdout/stderr and end the process with `status`, skipping interpreter shutdown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):  # closed or replaced stream: nothing to flush
            continue
    os._exit(status)


def _terminate_dataflow_if_used() -> None:
    if _dataflow_used:
        _terminate_dataflow()
