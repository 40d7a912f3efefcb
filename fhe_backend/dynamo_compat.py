"""Make torch.compile's backend comparison safe for options that hold tensors.

Dynamo compares the wrapper of a new `torch.compile(..., backend="fhe", options=...)` call
with the cached one (`_TorchCompileWrapper.__eq__` compares the options dicts with ``==``).
With an inputset tensor in each dict, two different tensors compare element-wise and Python
raises "Boolean value of Tensor with more than one value is ambiguous": compiling two modules
of one class with their own inputsets crashed. For the fhe backend, options are equal when
they hold the same objects (tensors by identity), which is what dynamo needs to know.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

BACKEND_NAMES = ("fhe", "fhe_backend")  # torch.compile(backend="fhe") or the function itself
_original_eq = torch._TorchCompileWrapper.__eq__  # noqa: SLF001


def same_options(first: Any, second: Any) -> bool:
    """Equality of option values with tensors (and arrays) compared by identity."""
    if first is second:
        return True
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(same_options(first[k], second[k]) for k in first)
    if isinstance(first, (list, tuple)) and isinstance(second, (list, tuple)):
        return (
            type(first) is type(second)
            and len(first) == len(second)
            and all(same_options(a, b) for a, b in zip(first, second))
        )
    if hasattr(first, "shape") or hasattr(second, "shape"):  # tensors and arrays: identity only
        return False
    try:
        return bool(first == second)
    except Exception:  # noqa: BLE001 - objects without a usable ==: different options
        return False


def fhe_compile_wrapper(backend: Any) -> Optional[Any]:
    """The `torch.compile(..., backend="fhe", options=...)` wrapper behind a dynamo callback or
    compiler function (following `_torchdynamo_orig_backend`), or None for another backend or
    a torch that lays its wrappers out differently."""
    for _ in range(4):
        if getattr(backend, "compiler_name", None) in BACKEND_NAMES and isinstance(
            getattr(backend, "kwargs", None), dict
        ):
            return backend
        backend = getattr(backend, "_torchdynamo_orig_backend", None)
    return None


def _wrapper_eq(self: Any, other: Any) -> bool:
    if isinstance(other, torch._TorchCompileWrapper) and BACKEND_NAMES.__contains__(  # noqa: SLF001
        getattr(self, "compiler_name", None)
    ):
        return (
            self.compiler_fn == other.compiler_fn
            and self.dynamic == other.dynamic
            and same_options(self.kwargs, other.kwargs)
        )
    return _original_eq(self, other)


def install() -> None:
    """Patch the comparison once (only fhe wrappers are compared differently)."""
    torch._TorchCompileWrapper.__eq__ = _wrapper_eq  # noqa: SLF001
