"""Fold subgraphs that depend only on constants (e.g. transposed weights) into constants."""

from __future__ import annotations

import torch
import torch.fx as fx


def _constant_value(graph_module: fx.GraphModule, node: fx.Node):
    value = graph_module
    for part in node.target.split("."):
        value = getattr(value, part)
    return value


def _is_random(node: fx.Node) -> bool:
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags or torch.Tag.dynamic_output_shape in tags


def fold_constants(graph_module: fx.GraphModule, settings=None) -> fx.GraphModule:
    """Evaluate call_function nodes whose inputs are all constants; store the results."""
    values = {}
    for node in list(graph_module.graph.nodes):
        if node.op == "get_attr":
            values[node] = _constant_value(graph_module, node)
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
        name = f"_folded_{node.name}"
        graph_module.register_buffer(name, result.detach().clone(), persistent=False)
        with graph_module.graph.inserting_before(node):
            constant = graph_module.graph.get_attr(name)
        constant.meta = dict(node.meta)
        node.replace_all_uses_with(constant)
        graph_module.graph.erase_node(node)
        values[constant] = result
    graph_module.graph.eliminate_dead_code()
    return graph_module
