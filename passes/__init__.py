"""Graph passes run on the captured ATen graph, in order, before partitioning.

Each pass is one function `(graph_module, settings) -> graph_module` in a file of its own;
`PassManager` runs them and names the pass that failed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch.fx as fx

from fhe_backend.errors import FheBackendError, PassError

from .decompose_fused import decompose_fused
from .detect_fake_quant import detect_fake_quant
from .fold_constants import fold_constants
from .free_batch_views import free_batch_views
from .masked_assign import masked_assign
from .masked_softmax import masked_softmax
from .remove_identities import remove_identities
from .sizes_from_inputs import sizes_from_inputs

GraphPass = Callable[[fx.GraphModule, object], fx.GraphModule]

DEFAULT_PASSES: Sequence[GraphPass] = (
    decompose_fused,
    remove_identities,
    masked_assign,
    fold_constants,
    masked_softmax,
    detect_fake_quant,
    free_batch_views,
    sizes_from_inputs,
)


class PassManager:
    """Runs graph passes in order; an exception names the failing pass."""

    def __init__(self, passes: Sequence[GraphPass] = DEFAULT_PASSES):
        self.passes = tuple(passes)

    def __call__(self, graph_module: fx.GraphModule, settings) -> fx.GraphModule:
        """Apply every pass and return the transformed graph module."""
        for graph_pass in self.passes:
            try:
                graph_module = graph_pass(graph_module, settings)
            except FheBackendError:
                raise
            except Exception as error:
                raise PassError(
                    f"graph pass '{graph_pass.__name__}' failed: {type(error).__name__}: {error}"
                ) from error
            graph_module.graph.lint()
        graph_module.recompile()
        return graph_module


__all__ = [
    "DEFAULT_PASSES",
    "PassManager",
    "decompose_fused",
    "detect_fake_quant",
    "fold_constants",
    "free_batch_views",
    "masked_assign",
    "masked_softmax",
    "remove_identities",
    "sizes_from_inputs",
]
