"""The package's exceptions: every error says what failed, where, and how to fix it."""

from __future__ import annotations


class FheBackendError(Exception):
    """Base class of every error raised by fhe_backend."""


class OptionError(FheBackendError, ValueError):
    """An option passed to the backend or to the compile API is unknown or has a bad value."""


class UnsupportedOpError(FheBackendError):
    """An operator inside the FHE target has no lowering (raised with `require_full_fhe=True`)."""


class BitWidthError(FheBackendError, ValueError):
    """A table lookup would exceed Concrete's precision limit."""


class LoweringError(FheBackendError):
    """A supported operator could not be turned into an integer program or a circuit."""


class PassError(FheBackendError):
    """A graph or module pass failed; the message names the pass."""


class NotCompiledError(FheBackendError, RuntimeError):
    """Something needs a compiled circuit before the model has been compiled."""
