"""Calibration of the graphs after a graph break: run the compiled model on the inputset again.

Dynamo splits a model at a graph break (a print, ``.item()``, a data-dependent ``if``) into
several graphs; only the first one takes the model's inputs. A later graph takes the values
the Python code between the graphs hands it, so it cannot be calibrated on the inputset
itself: the values that reach it are only known by running the model. When a graph's inputs
are not the very tensors the compiled model was called with, the backend defers its
calibration; at its first call, `Replay` runs the whole compiled model (through dynamo, as the
user called it) on the inputset under ``fhe_mode("calibrate")``, so that each graph records
the values that actually reach it, and the backend then compiles them.
"""

from __future__ import annotations

import os
import sys
import weakref
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils._pytree import tree_leaves, tree_map

from .dynamo_compat import fhe_compile_wrapper
from .errors import OptionError

_EVAL_FRAME = os.path.join("_dynamo", "eval_frame.py")


class _Slot:
    """Where a call's tensor argument goes (its position among the tensors)."""

    def __init__(self, index: int):
        self.index = index


def _weak(value: Any) -> Callable[[], Any]:
    """A weak reference to `value` (a bound method through its object), or a strong one when
    the object takes none."""
    try:
        return weakref.WeakMethod(value) if hasattr(value, "__self__") else weakref.ref(value)
    except TypeError:
        return lambda: value


class Replay:
    """Runs a torch.compile'd model again through dynamo: its dynamo context and the function it
    wraps (both held weakly), with the tensors of the call that was being compiled."""

    def __init__(self, context: Any, function: Any, args: Any, kwargs: Any):
        self._context = _weak(context)
        self._function = _weak(function)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.call_shapes = [(tuple(t.shape), t.dtype) for t in tensors]
        # the call's structure, each tensor replaced by its position among the tensors
        positions = iter(range(len(tensors)))
        self._structure = tree_map(
            lambda x: _Slot(next(positions)) if isinstance(x, torch.Tensor) else x, (args, kwargs or {})
        )

    @property
    def alive(self) -> bool:
        """False once the compiled model is gone."""
        return self._context() is not None and self._function() is not None

    def __call__(self, tensors: Sequence[torch.Tensor]) -> Any:
        """Run the compiled model on one batch (one of `chunks`) through dynamo."""
        context, function = self._context(), self._function()
        if context is None or function is None:
            raise OptionError("the compiled model is gone: its graphs cannot be calibrated again")
        args, kwargs = tree_map(lambda x: tensors[x.index] if isinstance(x, _Slot) else x, self._structure)
        return context(function)(*args, **kwargs)

    def chunks(self, inputset: Sequence[Sequence[torch.Tensor]]) -> List[List[torch.Tensor]]:
        """The inputset re-cut into batches of the first call's size (the last one completed
        with samples from the start): the model then runs through the graphs dynamo compiled
        for that call, with no recompilation for another batch size (a recompiled frame may
        fail where the first one traced, and dynamo would then run it as eager Python)."""
        columns = [torch.cat(column) for column in zip(*[self.conformed(batch) for batch in inputset])]
        size = self.call_shapes[0][0][0] if self.call_shapes and self.call_shapes[0][0] else 0
        total = int(columns[0].shape[0]) if columns else 0
        if not size or not total:
            return [self.conformed(batch) for batch in inputset]
        cyclic = torch.arange(-(-total // size) * size) % total
        return [[c[cyclic[i : i + size]] for c in columns] for i in range(0, len(cyclic), size)]

    def conformed(self, batch: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """An inputset batch cast to the first call's float dtype, a single sample made a batch
        of one; an OptionError names the inputset's shape and the call's when they disagree."""
        if len(batch) != len(self.call_shapes):
            raise OptionError(
                f"inputset batches have {len(batch)} tensor(s) but the model was called with "
                f"{len(self.call_shapes)} tensor(s)"
            )
        conformed = []
        for index, (tensor, (shape, dtype)) in enumerate(zip(batch, self.call_shapes)):
            if tensor.dim() == len(shape) - 1:
                tensor = tensor.unsqueeze(0)
            if tensor.dim() != len(shape) or tuple(tensor.shape[1:]) != shape[1:]:
                raise OptionError(
                    f"inputset: a batch for input {index} has shape {tuple(tensor.shape)}, the model "
                    f"was called with (N, {', '.join(map(str, shape[1:]))}) (N samples on dim 0)"
                )
            if tensor.dtype != dtype and tensor.is_floating_point() and dtype.is_floating_point:
                tensor = tensor.to(dtype)
            conformed.append(tensor)
        return conformed


def dynamo_call(options: Any) -> Optional[Tuple[Replay, List[torch.Tensor]]]:
    """The torch.compile'd call being compiled for these backend `options`: a `Replay` of it and
    the tensors it was called with; None outside such a call (torch.export, a direct backend
    call, another torch.compile layout).

    Dynamo's ``compile_wrapper`` frame (the function `torch.compile` returned, or an
    OptimizedModule's forward) holds the dynamo context, the wrapped function and the call's
    arguments; the nearest one compiling for these very options is the call.
    """
    frame = sys._getframe(1)  # noqa: SLF001 - dynamo hands the backend no handle on the call
    while frame is not None:
        code = frame.f_code
        if code.co_name == "compile_wrapper" and code.co_filename.endswith(_EVAL_FRAME):
            local = frame.f_locals
            context = local.get("self")
            wrapper = fhe_compile_wrapper(getattr(context, "callback", None))
            if wrapper is not None and wrapper.kwargs.get("options") is options and "fn" in local:
                args, kwargs = local.get("args", ()), local.get("kwargs", {})
                tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                return Replay(context, local["fn"], args, kwargs), tensors
        frame = frame.f_back
    return None


def fed_by_call(graph_tensors: Sequence[Any], call_tensors: Sequence[torch.Tensor]) -> bool:
    """True when every tensor input of a graph is one the model was called with (the inputset
    reaches the graph as it is); False for values computed before a graph break."""
    call_ids = {id(t) for t in call_tensors}
    return all(id(t) in call_ids for t in graph_tensors if isinstance(t, torch.Tensor))
