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
    whole_batch: set = set()  # values that are one for the whole batch, not one row per sample
    for node in graph_module.graph.nodes:
        if node.op == "placeholder" and _is_scalar(node):
            whole_batch.add(node)
        if not _is_compute(node):
            continue
        group = target.get(node)
        reason = unsupported_reason(node)
        inputs = [arg for arg in node.all_input_nodes if _is_tensor_arg(arg) and arg.op != "get_attr"]
        batch_wide = [arg for arg in inputs if arg in whole_batch]
        if mixes_samples(reason) or _is_scalar(node) or (inputs and len(batch_wide) == len(inputs)):
            whole_batch.add(node)
        if group is None:
            reason = "not in a module marked for FHE"
        elif reason is None and batch_wide:
            reason = (f"its input '{batch_wide[0].name}' is one value for the whole batch (computed across "
                      f"samples in torch); {ONE_SAMPLE_AT_A_TIME}")
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
