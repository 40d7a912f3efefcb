"""Remove ops that return their input unchanged (detach, alias, clone, no-op dtype casts).

A clone of a non-contiguous tensor (e.g. of an `expand`) is kept: it makes the layout
contiguous, and a later `view` depends on that.
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten
IDENTITIES = {aten.detach.default, aten.alias.default, aten.clone.default, aten.lift_fresh_copy.default}


def _is_identity(node: fx.Node) -> bool:
    if node.op != "call_function" or not node.args:
        return False
    if node.target == aten.clone.default:
        return _is_contiguous(node.args[0])
    if node.target in IDENTITIES:
        return True
    if node.target == aten._to_copy.default:
        source, value = node.args[0].meta.get("val"), node.meta.get("val")
        return (
            isinstance(source, torch.Tensor)
            and isinstance(value, torch.Tensor)
            and source.dtype == value.dtype
            and source.device == value.device
        )
    return False


def _is_contiguous(node) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.is_contiguous()


def remove_identities(graph_module: fx.GraphModule, settings=None) -> fx.GraphModule:
    """Replace every identity op by its input."""
    for node in list(graph_module.graph.nodes):
        if _is_identity(node):
            node.replace_all_uses_with(node.args[0])
            graph_module.graph.erase_node(node)
    return graph_module
