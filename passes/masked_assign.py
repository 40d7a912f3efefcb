"""Masked assignment as a select: ``y[mask] = value`` is captured as ``index_put(y, [mask],
value)``; with one boolean mask of y's own shape and a single value it is ``where(mask, value,
y)``, which the lowerings handle (an encrypted mask: fused into one table lookup with its
neighbours; a constant one: leveled). Other `index_put`s are left as they are.
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten
INDEX_PUTS = {aten.index_put.default, aten.index_put_.default}


def _tensor(node) -> object:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_masked_assignment(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in INDEX_PUTS or len(node.args) < 3:
        return False
    accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    target, indices, value = node.args[:3]
    if accumulate or not isinstance(indices, (list, tuple)) or len(indices) != 1:
        return False
    mask, target_value, new_value = _tensor(indices[0]), _tensor(target), _tensor(value)
    return (
        isinstance(mask, torch.Tensor)
        and isinstance(target_value, torch.Tensor)
        and isinstance(new_value, torch.Tensor)
        and mask.dtype == torch.bool
        and tuple(mask.shape) == tuple(target_value.shape)
        and new_value.numel() == 1
    )


def masked_assign(graph_module: fx.GraphModule, settings=None) -> fx.GraphModule:
    """Replace each masked assignment of one value by `where(mask, value, y)`."""
    graph = graph_module.graph
    for node in list(graph.nodes):
        if not _is_masked_assignment(node):
            continue
        target, (mask,), value = node.args[:3]
        with graph.inserting_before(node):
            select = graph.call_function(aten.where.self, (mask, value, target))
        select.meta = dict(node.meta)
        node.replace_all_uses_with(select)
        graph.erase_node(node)
    return graph_module
