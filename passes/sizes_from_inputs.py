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

import operator
from typing import Any, Callable, Dict, List, Optional, Tuple

import sympy
import torch
import torch.fx as fx

from fhe_backend.graph_utils import symbolic_expr

aten = torch.ops.aten
# sympy (and torch.utils._sympy) functions -> the Python operator folding their arguments
OPERATORS: Dict[str, Callable[[Any, Any], Any]] = {
    "Add": operator.add,
    "Mul": operator.mul,
    "FloorDiv": operator.floordiv,
    "PythonMod": operator.mod,
    "Mod": operator.mod,
}


def _symbol_sources(graph: fx.Graph) -> Dict[sympy.Symbol, Tuple[fx.Node, Optional[int]]]:
    """Each symbol the graph's inputs carry -> where its value is: (the symbolic-size input,
    None), or (a tensor input, the dimension that is exactly that symbol)."""
    sources: Dict[sympy.Symbol, Tuple[fx.Node, Optional[int]]] = {}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("val")
        sizes: List[Tuple[Optional[int], Any]] = [(None, value)]  # a symbolic-size input
        if isinstance(value, torch.Tensor):
            sizes = list(enumerate(value.shape))
        for dim, size in sizes:
            expr = symbolic_expr(size)
            if expr is not None and expr.is_Symbol:
                sources.setdefault(expr, (node, dim))
    return sources


def _supported(expr: Any, sources: Dict[sympy.Symbol, Tuple[fx.Node, Optional[int]]]) -> bool:
    """Whether every operation and symbol of `expr` has a counterpart here."""
    return all(
        part.is_Integer
        or (part.is_Symbol and part in sources)
        or type(part).__name__ in OPERATORS
        or (part.is_Pow and part.exp.is_Integer and part.exp >= 0)  # s0**2: duck-sized dims
        for part in sympy.preorder_traversal(expr)
    )


class _Builder:
    """Nodes computing size expressions from the graph's inputs; each input size is read once."""

    def __init__(self, graph: fx.Graph, sources: Dict[sympy.Symbol, Tuple[fx.Node, Optional[int]]]):
        self.graph, self.sources = graph, sources
        self.made: Dict[sympy.Symbol, fx.Node] = {}

    def __call__(self, expr: Any) -> Any:
        """`expr` (checked with `_supported`) as a node, or an int for a constant."""
        if expr.is_Integer:
            return int(expr)
        if expr.is_Symbol:
            return self._symbol(expr)
        fold = operator.pow if expr.is_Pow else OPERATORS[type(expr).__name__]
        args = [self(arg) for arg in expr.args]
        result = args[0]
        for arg in args[1:]:
            result = self.graph.call_function(fold, (result, arg))
        return result

    def _symbol(self, symbol: sympy.Symbol) -> fx.Node:
        if symbol not in self.made:
            node, dim = self.sources[symbol]
            if dim is not None:
                size = node.meta["val"].shape[dim]
                node = self.graph.call_function(aten.sym_size.int, (node, dim))
                node.meta["val"] = size
            self.made[symbol] = node
        return self.made[symbol]


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
        and symbolic_expr(node.meta.get("val")) is not None
    ]
    if not reads:
        return graph_module
    sources = _symbol_sources(graph)
    build = _Builder(graph, sources)
    after_inputs = [node for node in graph.nodes if node.op == "placeholder"][-1].next
    for node in reads:
        expr = sympy.sympify(symbolic_expr(node.meta["val"]))
        if not _supported(expr, sources):
            continue  # the read stays (the partitioner warns where it cuts an FHE region)
        with graph.inserting_before(after_inputs):
            size = build(expr)
        if isinstance(size, fx.Node):  # a new fold has none; an input size keeps its own
            size.meta.setdefault("val", node.meta["val"])
        node.replace_all_uses_with(size)
        graph.erase_node(node)
    graph_module.recompile()
    return graph_module
