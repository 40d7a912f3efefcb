"""The package's exceptions: every error says what failed, where, and how to fix it."""

from __future__ import annotations

from typing import Dict

from torch._dynamo.exc import ShortenTraceback


class FheBackendError(Exception):
    """Base class of every error raised by fhe_backend."""


class OptionError(FheBackendError, ValueError):
    """An option passed to the backend or to the compile API is unknown or has a bad value."""


class UnsupportedOpError(FheBackendError):
    """An operator inside the FHE target has no lowering (raised with `require_full_fhe=True`)."""


class BitWidthError(FheBackendError, ValueError):
    """A table lookup would exceed Concrete's precision limit."""


class NoParametersFoundError(BitWidthError, RuntimeError):
    """Concrete found no crypto parameters for a circuit, and nothing was left to narrow (a
    `BitWidthError`; also a `RuntimeError`, what Concrete and Concrete ML raise there)."""


class LoweringError(FheBackendError):
    """A supported operator could not be turned into an integer program or a circuit."""


class PassError(FheBackendError):
    """A graph or module pass failed; the message names the pass."""


class NotCompiledError(FheBackendError, RuntimeError):
    """Something needs a compiled circuit before the model has been compiled."""


class KeyGenerationError(FheBackendError, RuntimeError):
    """Keys could not be generated or written (a key cache on a full disk, say)."""


class ClearTextWarning(UserWarning):
    """Part of a model that should run in FHE runs as eager torch, its values in the clear."""


_SURFACED: Dict[type, type] = {}


def surfaced(error: FheBackendError) -> FheBackendError:
    """The same error, of a subclass dynamo lets through unwrapped (its ShortenTraceback), so
    that a caller of a compiled model catches e.g. an `OptionError` as it is."""
    cls = type(error)
    if cls not in _SURFACED:
        _SURFACED[cls] = type(
            cls.__name__,
            (cls, ShortenTraceback),
            {"__init__": Exception.__init__, "__module__": cls.__module__, "__qualname__": cls.__qualname__},
        )
    result = _SURFACED[cls](*error.args)
    result.first_useful_frame = None
    return result.with_traceback(error.__traceback__)


# What Concrete 2.11's compiler raises for a program it cannot compile: RuntimeError from the
# optimizer (NoParametersFound) and the MLIR compiler; ValueError and AssertionError from its
# Python converter (e.g. per-channel tables of a rounded value it resizes).
CONCRETE_COMPILE_ERRORS = (RuntimeError, ValueError, AssertionError)
