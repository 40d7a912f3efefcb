"""Partitioning: which nodes run in FHE, fused into `fhe_partition_N` submodules.

The FHE target is the nodes of marked modules (decorator or `module_names`), or the whole graph
when nothing is marked. Target nodes the lowering registry accepts are fused, per marked
module, with `CapabilityBasedPartitioner`; everything else stays eager torch and is reported.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from .errors import UnsupportedOpError
from .lowering.registry import ONE_SAMPLE_AT_A_TIME, mixes_samples, op_name, unsupported_reason
from .runtime import FhePartition
from .settings import FheSettings

PARTITION_PREFIX = "fhe_partition_"


@dataclass
class TorchNode:
    """A compute node left in eager torch and why."""

    name: str
    op: str
    module: str
    reason: str
    source: str = ""

    def __str__(self) -> str:
        where = f" in module '{self.module}'" if self.module else ""
        line = f" at {self.source}" if self.source else ""
        return f"{self.op} (node '{self.name}'){where}{line}: {self.reason}"


@dataclass
class TargetGroup:
    """Nodes that must run in FHE with one settings object (one marked module, or all)."""

    key: str
    settings: FheSettings
    nodes: List[fx.Node] = field(default_factory=list)


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
    """"L['self'].seq._modules['0']" or "L['fn'].0" -> 'seq.0'."""
    path = re.sub(r"^L\['[^']*'\]\.?", "", raw)
    path = re.sub(r"_modules\['([^']*)'\]", r"\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".").replace("..", ".")


def source_line(node: fx.Node) -> str:
    """'file:line' of the user code that produced the node, when known."""
    trace = node.meta.get("stack_trace") or ""
    matches = re.findall(r'File "([^"]+)", line (\d+)', trace)
    return f"{matches[-1][0]}:{matches[-1][1]}" if matches else ""


class _InTarget(OperatorSupportBase):
    def __init__(self, nodes: Sequence[fx.Node]):
        super().__init__()
        self.nodes = set(nodes)

    def is_node_supported(self, submodules, node: fx.Node) -> bool:
        return node in self.nodes


def _is_compute(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    value = node.meta.get("val")
    return isinstance(value, (torch.Tensor, tuple, list))


def partition(graph_module: fx.GraphModule, groups: Sequence[TargetGroup],
              input_status: Dict[str, str]) -> Tuple[fx.GraphModule, List[FhePartition], List[TorchNode]]:
    """Fuse the supported target nodes into FhePartition submodules.

    Returns the split graph module, its partitions (in graph order) and the compute nodes left
    in torch with their reasons. Unsupported target nodes warn (or raise with require_full_fhe).
    """
    target = {node: group for group in groups for node in group.nodes}
    left_in_torch: List[TorchNode] = []
    supported_by_group: Dict[str, List[fx.Node]] = {g.key: [] for g in groups}
    batch_dims: Dict[fx.Node, Optional[int]] = {}  # where each value keeps the batch (None: nowhere)
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            batch_dims[node] = None if _is_scalar(node) else 0
        if not _is_compute(node):
            continue
        group = target.get(node)
        reason = unsupported_reason(node)
        inputs = [arg for arg in node.all_input_nodes if _is_tensor_arg(arg) and arg.op != "get_attr"]
        input_dims = [batch_dims.get(arg, 0) for arg in inputs]
        batch_dims[node] = _batch_dim(node, reason, input_dims)
        moved = next(((arg, dim) for arg, dim in zip(inputs, input_dims) if dim != 0), None)
        if group is None:
            reason = "not in a module marked for FHE"
        elif reason is None and moved is not None:
            arg, dim = moved
            where = ("is one value for the whole batch (computed across samples in torch)"
                     if dim is None else f"has the batch at dim {dim}, not 0")
            reason = f"its input '{arg.name}' {where}; {ONE_SAMPLE_AT_A_TIME}"
        if reason is None:
            supported_by_group[group.key].append(node)
            continue
        record = TorchNode(node.name, op_name(node), module_path(node), reason, source_line(node))
        left_in_torch.append(record)
        if group is not None:
            if group.settings.require_full_fhe:
                raise UnsupportedOpError(f"cannot run in FHE: {record}. Rewrite this op, or drop "
                                         "require_full_fhe to run it in torch")
            warnings.warn(f"fhe_backend: running in torch instead of FHE: {record}", stacklevel=2)

    proposals: List[Tuple[TargetGroup, Dict[fx.Node, None]]] = []
    for group in groups:
        nodes = supported_by_group[group.key]
        if not nodes:
            continue
        partitioner = CapabilityBasedPartitioner(graph_module, _InTarget(nodes),
                                                 allows_single_node_partition=True)
        for proposal in partitioner.propose_partitions():
            proposals.append((group, dict.fromkeys(proposal.nodes)))
    order = {node: i for i, node in enumerate(graph_module.graph.nodes)}
    proposals.sort(key=lambda item: min(order[n] for n in item[1]))
    for _, nodes in proposals:
        _own_constants(graph_module, nodes)
    fused = fuse_by_partitions(graph_module, [nodes for _, nodes in proposals],
                               prefix=PARTITION_PREFIX)
    partitions = []
    for index, (group, _) in enumerate(proposals):
        name = f"{PARTITION_PREFIX}{index}"
        sub = getattr(fused, name)
        call = next(n for n in fused.graph.nodes if n.op == "call_module" and n.target == name)
        status = [input_status.get(arg.name, "encrypted") if isinstance(arg, fx.Node) else "encrypted"
                  for arg in call.args if _is_tensor_arg(arg)]
        wrapper = FhePartition(name, sub, group.settings, status, group.key)
        setattr(fused, name, wrapper)
        partitions.append(wrapper)
    fused.recompile()
    return fused, partitions, left_in_torch


def _batch_dim(node: fx.Node, reason: Optional[str], input_dims: List[Optional[int]]) -> Optional[int]:
    """Where `node`'s value keeps the batch, from its inputs' (None: a value of the whole batch).

    A permute moves the batch with its dims (attention's `permute(2, 0, 1, 3)` and back); a
    value of the whole batch broadcast onto batch-major ones keeps their batch dim; an op that
    acts across samples, a 0-d value, or inputs with the batch at different dims leave it nowhere.
    """
    if node.target is torch.ops.aten.permute.default and len(input_dims) == 1:
        dims = [d % max(len(node.args[1]), 1) for d in node.args[1]]
        return None if input_dims[0] is None or input_dims[0] not in dims else dims.index(input_dims[0])
    kept = set(input_dims) - {None}
    if mixes_samples(reason) or _is_scalar(node) or len(kept) > 1 or (input_dims and not kept):
        return None
    return kept.pop() if kept else 0


def _is_scalar(node: fx.Node) -> bool:
    """A 0-d tensor value: it has no batch dim, so no circuit can take a row of it per sample."""
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() == 0


def _is_tensor_arg(arg) -> bool:
    value = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    return isinstance(value, torch.Tensor)


def _own_constants(graph_module: fx.GraphModule, nodes: Dict[fx.Node, None]) -> None:
    """Give the partition its own copy of each constant it reads, so weights stay inside it."""
    graph = graph_module.graph
    for node in list(nodes):
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg not in nodes:
                with graph.inserting_before(node):
                    copy = graph.get_attr(arg.target)
                copy.meta = dict(arg.meta)
                node.replace_input_with(arg, copy)
                nodes[copy] = None
    graph.eliminate_dead_code()


def fhe_partitions(model: torch.nn.Module) -> List[FhePartition]:
    """Every FhePartition under a module (compiled model, split graph, hybrid model...)."""
    return [m for m in model.modules() if isinstance(m, FhePartition)]


def graph_batch_name(graph_module: fx.GraphModule) -> Optional[str]:
    """Name of the first tensor placeholder (the input whose dim 0 is the batch)."""
    for node in graph_module.graph.nodes:
        if node.op == "placeholder" and _is_tensor_arg(node):
            return node.name
    return None
