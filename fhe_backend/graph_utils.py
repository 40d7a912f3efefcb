"""Small helpers on FX graphs and call results, shared by the pipeline's stages.

A leaf module (it imports only torch): the passes, the partitioner, the integer program, the
runtime and the compile API use these instead of keeping private copies.
"""

from __future__ import annotations

import re
from typing import Any, List, Tuple, Union

import torch
import torch.fx as fx


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
