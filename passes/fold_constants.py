"""Fold subgraphs that depend only on constants (e.g. transposed weights) into constants.

A folded value must not bake the traced batch size: a constant broadcast to the batch (BERT's
`token_type_ids` buffer expanded to (batch, seq) and embedded) is the same row for every
sample. Where such a value (dim 0 of the traced batch size, every row equal) only feeds
element-wise ops that broadcast it against a batch-sized operand, it is folded to its first
row: the same results at any batch size, and a circuit compiled for one sample adds the row
it needs.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fhe_backend.graph_utils import fetch_attr
from fhe_backend.lowering.batch import graph_batch


def _is_random(node: fx.Node) -> bool:
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags or torch.Tag.dynamic_output_shape in tags


def _broadcast_row(graph_module: fx.GraphModule, node: fx.Node, result) -> bool:
    """True when `result` is one row repeated over the traced batch, and every user of `node`
    is an element-wise op whose output keeps its shape through another, batch-sized operand."""
    batch = graph_batch(graph_module.graph)
    if not isinstance(batch, int) or batch < 2 or not isinstance(result, torch.Tensor):
        return False
    if result.dim() == 0 or result.shape[0] != batch or not torch.equal(result, result[:1].expand_as(result)):
        return False
    for user in node.users:
        tags = getattr(user.target, "tags", ())
        out = user.meta.get("val")
        others = [a for a in user.all_input_nodes if a is not node]
        if (
            torch.Tag.pointwise not in tags
            or not isinstance(out, torch.Tensor)
            or tuple(out.shape) != tuple(result.shape)
            or not any(_leading(a) == batch for a in others)
        ):
            return False
    return True


def _leading(node: fx.Node):
    value = node.meta.get("val")
    return value.shape[0] if isinstance(value, torch.Tensor) and value.dim() else None


def _like(fake, value):
    """A traced value of `value`'s shape in `fake`'s fake mode (or `value` itself)."""
    mode = getattr(fake, "fake_mode", None)
    return mode.from_tensor(value) if mode is not None else value


def fold_constants(graph_module: fx.GraphModule, settings=None) -> fx.GraphModule:
    """Evaluate call_function nodes whose inputs are all constants; store the results."""
    values = {}
    for node in list(graph_module.graph.nodes):
        if node.op == "get_attr":
            values[node] = fetch_attr(graph_module, node.target)
            continue
        if node.op != "call_function" or _is_random(node):
            continue
        if not all(arg in values for arg in node.all_input_nodes):
            continue
        args = fx.node.map_arg(node.args, lambda n: values[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
        result = node.target(*args, **kwargs)
        if not isinstance(result, torch.Tensor):
            continue
        if _broadcast_row(graph_module, node, result):
            result = result[:1]
        name = f"_folded_{node.name}"
        graph_module.register_buffer(name, result.detach().clone(), persistent=False)
        with graph_module.graph.inserting_before(node):
            constant = graph_module.graph.get_attr(name)
        constant.meta = dict(node.meta)
        if tuple(result.shape) != tuple(node.meta["val"].shape if "val" in node.meta else result.shape):
            constant.meta["val"] = _like(node.meta["val"], result)
        node.replace_all_uses_with(constant)
        graph_module.graph.erase_node(node)
        values[constant] = result
    graph_module.graph.eliminate_dead_code()
    return graph_module
