"""Let reshapes that keep the batch dimension follow it: `view(x, [1, 32])` -> `view(x, [-1, 32])`.

AOTAutograd bakes the traced batch size into reshapes (a `flatten(1)` of a batch of one becomes
`view(x, [1, 32])`), so a graph traced on one sample only runs on one sample. Where a reshape
keeps dim 0 (its first size equals its input's dim 0, nothing else inferred), writing -1 there
means the same thing for the traced shapes and lets the graph run on any batch, which is how
calibration goes through the inputset in large chunks (checked on a probe before use).
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten
RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def _batch_kept(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in RESHAPES or len(node.args) < 2:
        return False
    source, sizes = node.args[0], node.args[1]
    value = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(value, torch.Tensor) or not value.dim() or not isinstance(sizes, (list, tuple)):
        return False
    return (
        len(sizes) > 1
        and all(isinstance(s, int) for s in sizes)
        and -1 not in sizes
        and isinstance(value.shape[0], int)
        and sizes[0] == value.shape[0]
    )


def free_batch_views(graph_module: fx.GraphModule, settings=None) -> fx.GraphModule:
    """Write -1 for the batch size of every reshape that keeps dim 0."""
    for node in graph_module.graph.nodes:
        if _batch_kept(node):
            node.args = (node.args[0], [-1, *node.args[1][1:]], *node.args[2:])
    return graph_module
