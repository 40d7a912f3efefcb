"""Frames dynamo skips never reach the backend: notice them, say so, or raise.

When dynamo cannot trace a frame (``nn.LSTM`` / ``nn.GRU`` without
``torch._dynamo.config.allow_rnn``, an unsupported builtin...), it runs the whole frame as
eager Python and never calls the backend: a model compiled with ``backend="fhe"`` then runs
entirely in the clear. Dynamo's compile-end callback runs after each frame it tried; when that
frame was compiled for the ``fhe`` backend, no graph of it reached the backend and dynamo
recorded why, this module warns with a `ClearTextWarning` naming the frame, its source line and
dynamo's reason, or raises `UnsupportedOpError` under ``require_full_fhe=True``.

Dynamo remembers a skipped frame: later calls (and other instances of the same class) run it
without trying again, and without a new warning, until ``torch._dynamo.reset()``.
"""

from __future__ import annotations

import logging
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch._dynamo import callback as dynamo_callback
from torch._dynamo.utils import counters

from .dynamo_compat import fhe_compile_wrapper
from .errors import ClearTextWarning, OptionError, UnsupportedOpError, surfaced
from .settings import FheSettings

_state = threading.local()


@dataclass(frozen=True)
class SkippedFrame:
    """A frame dynamo ran as eager Python although it was compiled for the fhe backend."""

    function: str
    source: str
    reasons: List[str]

    def message(self) -> str:
        """What stays in the clear, where, why, and what to try."""
        reasons = "; ".join(r.splitlines()[0] for r in self.reasons) or "no graph was captured"
        return (
            f"fhe_backend: no graph of '{self.function}' ({self.source}) reached the FHE backend: "
            f"dynamo ran it as eager torch ({reasons}). Everything it computes is in the clear. "
            "Compile with torch.compile(..., fullgraph=True) to see the break; for RNNs "
            "torch._dynamo.config.allow_rnn = True lets dynamo capture them (the recurrent op "
            "then stays in torch, the rest can run in FHE)"
        )


def note_capture() -> None:
    """Called by the backend each time dynamo hands it a graph."""
    _state.captures = getattr(_state, "captures", 0) + 1


def _on_start(_args: Any) -> None:
    _state.start = (getattr(_state, "captures", 0), dict(counters["unimplemented"]))


def _on_end(_args: Any) -> None:
    start = getattr(_state, "start", None)
    _state.start = None
    if start is None or getattr(_state, "captures", 0) != start[0]:
        return
    frame = _compile_frame()
    if frame is None:
        return
    options = _fhe_options(frame.f_locals.get("compiler_fn"))
    if options is None:
        return
    new = [reason for reason, count in counters["unimplemented"].items() if count > start[1].get(reason, 0)]
    if not new:
        return
    code = frame.f_locals.get("code")
    skipped = SkippedFrame(
        getattr(code, "co_name", "?"),
        f"{getattr(code, 'co_filename', '?')}:{getattr(code, 'co_firstlineno', '?')}",
        new,
    )
    try:
        strict = FheSettings.from_options(options).require_full_fhe
    except OptionError:
        return  # the bad option is reported when a graph reaches the backend
    if strict and _release_pending_callback():
        raise surfaced(UnsupportedOpError(skipped.message() + " (raised because require_full_fhe=True)"))
    warnings.warn(skipped.message(), ClearTextWarning, stacklevel=2)


_PENDING = "_CompilationCallbackHandler__pending_callbacks_counter"


def _release_pending_callback() -> bool:
    """Let an error leave dynamo's end callback: its handler counts pending compiles and
    decrements the count only after the callbacks return, so count this one done first (else
    every later compile and `torch._dynamo.reset()` would fail). False if the handler differs."""
    handler = dynamo_callback.callback_handler
    if getattr(handler, _PENDING, 0) != 1:
        return False
    setattr(handler, _PENDING, 0)
    return True


def _compile_frame() -> Optional[Any]:
    """Dynamo's `_compile` frame on the stack (it holds the code object and the backend)."""
    frame = sys._getframe(2)  # noqa: SLF001 - dynamo's callbacks get no frame of their own
    while frame is not None and not (frame.f_code.co_name == "_compile" and "compiler_fn" in frame.f_locals):
        frame = frame.f_back
    return frame


def _fhe_options(compiler_fn: Any) -> Optional[Dict]:
    """The options of a torch.compile(..., backend="fhe") wrapper, or None for other backends."""
    wrapper = fhe_compile_wrapper(compiler_fn)
    return dict(wrapper.kwargs.get("options") or {}) if wrapper is not None else None


class _KeptCallbacks(list):
    """A callback list whose `clear()` (run by `torch._dynamo.reset()`) keeps this module's
    callbacks: a notebook's reset must not switch the check off."""

    def clear(self) -> None:
        """Drop every callback but this module's."""
        self[:] = [callback for callback in self if callback in (_on_start, _on_end)]


class _RecompileLimitFilter(logging.Filter):
    """Dynamo only logs when a frame hits its recompile limit and then runs it as eager Python
    for good (no compile, so no callbacks): for frames compiled for fhe, say it loudly."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "recompile_limit" not in str(record.msg):
            return True
        frame = _compile_frame()
        options = _fhe_options(frame.f_locals.get("compiler_fn")) if frame is not None else None
        if options is None:
            return True
        code = frame.f_locals.get("code")
        skipped = SkippedFrame(
            getattr(code, "co_name", "?"),
            f"{getattr(code, 'co_filename', '?')}:{getattr(code, 'co_firstlineno', '?')}",
            [
                f"dynamo hit torch._dynamo.config.recompile_limit "
                f"({torch._dynamo.config.recompile_limit}) for this code: one more "
                "module of the class, batch size or option set than it keeps"
            ],
        )
        warnings.warn(
            skipped.message() + ". Raise torch._dynamo.config.recompile_limit or call "
            "torch._dynamo.reset() between compilations",
            ClearTextWarning,
            stacklevel=2,
        )
        return True


# dynamo's default (8) counts every module of one class compiled with its own options
RECOMPILE_LIMIT = 64


def install() -> None:
    """Register the callbacks with dynamo (idempotent; they survive `torch._dynamo.reset()`),
    watch for its recompile limit, and raise that limit to RECOMPILE_LIMIT."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_log = logging.getLogger("torch._dynamo.convert_frame")
    if not any(isinstance(f, _RecompileLimitFilter) for f in dynamo_log.filters):
        dynamo_log.addFilter(_RecompileLimitFilter())
    handler = dynamo_callback.callback_handler
    for name, callback in (("start_callbacks", _on_start), ("end_callbacks", _on_end)):
        callbacks = getattr(handler, name)
        if not isinstance(callbacks, _KeptCallbacks):
            callbacks = _KeptCallbacks(callbacks)
            setattr(handler, name, callbacks)
        if callback not in callbacks:
            callbacks.append(callback)
