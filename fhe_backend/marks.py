"""Marking what must run in FHE: the `fhe_module` decorator and the `module_names` option.

Marks are found through each node's `nn_module_stack`: a node belongs to the innermost marked
module enclosing it. Per-module options (`@fhe_module(n_bits=4)`) override the global ones.
With no marks at all, the whole graph is the FHE target.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from .errors import OptionError
from .graph_utils import normalize_module_path
from .partition import TargetGroup
from .settings import FheSettings

_MARK_ATTRIBUTE = "_fhe_module_options"
_INSTANCE_MARKS: Dict[int, Tuple["weakref.ref[torch.nn.Module]", Dict[str, Any]]] = {}


def fhe_module(target: Any = None, **options: Any) -> Any:
    """Mark a module class or instance to run in FHE, optionally with its own options.

    Forms: ``@fhe_module``, ``@fhe_module(n_bits=4, rounding_threshold_bits=5)`` on a class;
    ``fhe_module(model.head)`` or ``fhe_module(model.head, n_bits=4)`` on an instance.
    """
    FheSettings().replace(**options)  # validate now, where the user wrote them
    if target is None:
        return lambda actual: fhe_module(actual, **options)
    if isinstance(target, type) and issubclass(target, torch.nn.Module):
        setattr(target, _MARK_ATTRIBUTE, dict(options))
        return target
    if isinstance(target, torch.nn.Module):
        _INSTANCE_MARKS[id(target)] = (weakref.ref(target), dict(options))
        return target
    raise TypeError(f"fhe_module marks an nn.Module class or instance, not {type(target).__name__}")


def _instance_options(key: str) -> Optional[Dict[str, Any]]:
    try:
        ref, options = _INSTANCE_MARKS[int(key)]
    except (KeyError, ValueError):
        return None
    return options if ref() is not None else None


def _names_match(path: str, name: str) -> bool:
    return path == name or path.replace(".", "_") == name.replace(".", "_")


def node_mark(node: fx.Node, settings: FheSettings) -> Optional[Tuple[str, Dict[str, Any]]]:
    """(module path, options) of the innermost marked module enclosing `node`, or None."""
    stack = node.meta.get("nn_module_stack") or {}
    for key, (raw_path, cls) in reversed(list(stack.items())):
        path = normalize_module_path(raw_path)
        options = _instance_options(key)
        if options is None:
            options = getattr(cls, _MARK_ATTRIBUTE, None) if isinstance(cls, type) else None
        if options is None and any(_names_match(path, name) for name in settings.module_names):
            options = {}
        if options is not None:
            return path, options
    return None


def target_groups(graph_module: fx.GraphModule, settings: FheSettings) -> List[TargetGroup]:
    """The FHE target of a graph: one group per marked module, or the whole graph."""
    groups: Dict[str, TargetGroup] = {}
    call_nodes = [n for n in graph_module.graph.nodes if n.op == "call_function"]
    for node in call_nodes:
        mark = node_mark(node, settings)
        if mark is None:
            continue
        path, options = mark
        if path not in groups:
            groups[path] = TargetGroup(path, settings.replace(**options) if options else settings)
        groups[path].nodes.append(node)
    if groups:
        return list(groups.values())
    if settings.module_names:
        known = sorted(
            {
                normalize_module_path(path)
                for n in call_nodes
                for path, _ in (n.meta.get("nn_module_stack") or {}).values()
            }
            - {""}
        )
        raise OptionError(
            f"option 'module_names' = {list(settings.module_names)!r} matches no "
            f"module of the model; its modules are {known}"
        )
    return [TargetGroup("", settings, call_nodes)]
