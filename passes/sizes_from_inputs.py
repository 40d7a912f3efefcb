"""Compute symbolic sizes from the graph's inputs: `sym_size(avg_pool2d, 2)` -> `sym_size(x, 2) // 2`.

Dynamo makes dimensions symbolic when it recompiles a frame for new shapes; `nn.Sequential.forward`
is one frame for every Sequential, so compiling a second model is enough. A reshape then takes
its sizes from an intermediate tensor (`flatten` reads `sym_size` of the pool before it). A size
read from a tensor inside an FHE region made the partitioner cut the region there, into two
circuits with a decryption between them, and gave a different program than the same model with
static shapes. Each such size is rebuilt here from its symbolic expression over the graph's
inputs (their symbolic sizes, or the dimensions of tensor inputs that are exactly a symbol),
so it no longer depends on the tensor (sums, products, non-negative integer powers, floor
divisions and remainders). Expressions of other kinds keep their node.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Dict, Optional

import sympy
import torch
import torch.fx as fx

aten = torch.ops.aten
# sympy (and torch.utils._sympy) functions -> the Python operator folding their arguments
OPERATORS: Dict[str, Callable[[Any, Any], Any]] = {
    "Add": operator.add,
    "Mul": operator.mul,
    "FloorDiv": operator.floordiv,
    "PythonMod": operator.mod,
    "Mod": operator.mod,
}


def _expr(value: Any) -> Any:
    return getattr(getattr(value, "node", None), "expr", None)


def _symbol_sources(graph: fx.Graph) -> Dict[sympy.Symbol, Callable[[], fx.Node]]:
    """Each symbol the graph's inputs carry -> a maker of the node that gives its value: the
    symbolic-size input itself, or `sym_size` of a tensor input's dimension."""
    sources: Dict[sympy.Symbol, Callable[[], fx.Node]] = {}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("val")
        if isinstance(value, torch.SymInt) and _expr(value) is not None and _expr(value).is_Symbol:
            sources.setdefault(_expr(value), functools.partial(_itself, node))
        elif isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                expr = _expr(size)
                if expr is not None and expr.is_Symbol:
                    sources.setdefault(expr, functools.partial(_sym_size, graph, node, dim, size))
    return sources


def _itself(node: fx.Node) -> fx.Node:
    return node


def _sym_size(graph: fx.Graph, tensor: fx.Node, dim: int, size: torch.SymInt) -> fx.Node:
    node = graph.call_function(aten.sym_size.int, (tensor, dim))
    node.meta["val"] = size
    return node


def _build(graph: fx.Graph, expr: Any, sources: Dict[sympy.Symbol, Callable[[], fx.Node]]) -> Optional[Any]:
    """Nodes computing `expr` from the inputs (an int for a constant); None when an operation
    or a symbol has no counterpart."""
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        return sources[expr]() if expr in sources else None
    fold = OPERATORS.get(type(expr).__name__)
    if expr.is_Pow and expr.exp.is_Integer and expr.exp >= 0:  # s0**2: duck-sized dims
        fold = operator.pow
    if fold is None:
        return None
    args = [_build(graph, arg, sources) for arg in expr.args]
    if any(arg is None for arg in args):
        return None
    result = args[0]
    for arg in args[1:]:
        result = graph.call_function(fold, (result, arg))
    return result


def sizes_from_inputs(graph_module: fx.GraphModule, settings=None) -> fx.GraphModule:
    """Replace every `sym_size` of an intermediate tensor by its expression over the inputs."""
    graph = graph_module.graph
    reads = [
        node
        for node in graph.nodes
        if node.op == "call_function"
        and node.target == aten.sym_size.int
        and isinstance(node.args[0], fx.Node)
        and node.args[0].op != "placeholder"
        and _expr(node.meta.get("val")) is not None
    ]
    if not reads:
        return graph_module
    sources = _symbol_sources(graph)
    after_inputs = [node for node in graph.nodes if node.op == "placeholder"][-1].next
    for node in reads:
        with graph.inserting_before(after_inputs):
            size = _build(graph, sympy.sympify(_expr(node.meta["val"])), sources)
        if size is None:
            continue
        if isinstance(size, fx.Node):
            size.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(size)
        graph.erase_node(node)
    graph_module.recompile()
    return graph_module
