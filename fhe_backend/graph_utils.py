"""Small helpers on FX graphs and call results, shared by the pipeline's stages.

A leaf module (it imports only torch, sympy and the errors): the passes, the partitioner, the
integer program, the runtime and the compile API use these instead of keeping private copies.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Tuple, Union

import sympy
import torch
import torch.fx as fx

from .errors import LoweringError


def as_tuple(value: Any) -> Tuple[Any, ...]:
    """`value` itself when it is a tuple, else a tuple holding it (one output or several)."""
    return value if isinstance(value, tuple) else (value,)


def output_nodes(graph: Union[fx.GraphModule, fx.Graph, fx.Node]) -> List[fx.Node]:
    """The values a graph returns, in order: of a GraphModule, a Graph, or its output node."""
    if isinstance(graph, fx.Node):
        output = graph
    else:
        nodes = (graph.graph if isinstance(graph, fx.GraphModule) else graph).nodes
        output = next(n for n in nodes if n.op == "output")
    args = output.args[0]
    return list(args) if isinstance(args, (tuple, list)) else [args]


def fetch_attr(module: torch.nn.Module, target: str) -> Any:
    """The attribute a ``get_attr`` node names (dotted path from `module`); tensors detached."""
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value.detach() if isinstance(value, torch.Tensor) else value


def source_line(node: fx.Node) -> str:
    """'file:line' of the user code that produced the node, when known (else '')."""
    trace = node.meta.get("stack_trace") or ""
    matches = re.findall(r'File "([^"]+)", line (\d+)', trace)
    return f"{matches[-1][0]}:{matches[-1][1]}" if matches else ""


def where(node: fx.Node) -> str:
    """' (file:line)' of the user code behind `node`, '' when unknown."""
    line = source_line(node)
    return f" ({line})" if line else ""


def symbolic_expr(value: Any) -> Any:
    """The sympy expression of a symbolic size (a torch.SymInt), None for anything else."""
    return getattr(getattr(value, "node", None), "expr", None)


def solve_symbol(node: fx.Node, tensors: Dict[fx.Node, torch.Tensor]) -> int:
    """The value of a symbolic-size input for these tensors.

    Dynamo passes sizes such as ``s0`` or ``s0*16`` (a reshape of a dynamic batch) as graph
    inputs: each free symbol is bound from a dimension of a tensor input that is exactly that
    symbol, then the expression is evaluated.
    """
    value = node.meta.get("val")
    expr = symbolic_expr(value)
    if expr is None:
        return value
    bindings: Dict[Any, Any] = {}
    for tensor_node, tensor in tensors.items():
        for dim, size in enumerate(tensor_node.meta["val"].shape):
            size_expr = symbolic_expr(size)
            if size_expr is not None and size_expr.is_Symbol:
                bindings.setdefault(size_expr, sympy.Integer(int(tensor.shape[dim])))
    solved = sympy.sympify(expr).xreplace(bindings)
    if not solved.is_number:
        raise LoweringError(
            f"cannot compute the symbolic size input '{node.name}' = {expr} of a graph dynamo "
            f"recompiled: its symbols {sorted(map(str, solved.free_symbols))} are no dimension of "
            "the graph's tensor inputs. Compile with torch.compile(..., dynamic=False) to work around"
        )
    return int(solved)


def module_path(node: fx.Node) -> str:
    """The innermost module path of a node, as `named_modules()` spells it ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    raw = list(stack.values())[-1][0]
    return normalize_module_path(raw)


def module_paths(node: fx.Node) -> List[Tuple[str, type]]:
    """(path, class) of every module enclosing the node, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(normalize_module_path(path), cls) for path, cls in stack.values()]


def normalize_module_path(raw: str) -> str:
    """ "L['self'].seq._modules['0']" or "L['fn'].0" -> 'seq.0'."""
    path = re.sub(r"^L\['[^']*'\]\.?", "", raw)
    path = re.sub(r"_modules\['([^']*)'\]", r"\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".").replace("..", ".")


def node_label(node: fx.Node) -> str:
    """'module path/node name' of a node ('node name' at the root), as reports name it."""
    where_in_model = module_path(node)
    return f"{where_in_model}/{node.name}" if where_in_model else node.name
