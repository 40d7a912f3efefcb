"""Partitioning: which nodes run in FHE, fused into `fhe_partition_N` submodules.

The FHE target is the nodes of marked modules (decorator or `module_names`), or the whole graph
when nothing is marked. Target nodes the lowering registry accepts are fused, per marked
module, with `CapabilityBasedPartitioner`; everything else stays eager torch and is reported.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from .errors import UnsupportedOpError
from .graph_utils import module_path, module_paths, source_line, where
from .lowering.batch import (
    BATCH_MAJOR,
    BatchAt,
    Layout,
    MixesSamples,
    SizedConstant,
    batch_layout,
    graph_batch,
)
from .lowering.registry import ONE_SAMPLE_AT_A_TIME, op_name, unsupported_reason
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
    node: Optional[fx.Node] = field(default=None, repr=False, compare=False)

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


def partition(
    graph_module: fx.GraphModule, groups: Sequence[TargetGroup], input_status: Dict[str, str]
) -> Tuple[fx.GraphModule, List[FhePartition], List[TorchNode]]:
    """Fuse the supported target nodes into FhePartition submodules.

    Returns the split graph module, its partitions (in graph order) and the compute nodes left
    in torch with their reasons. Unsupported target nodes warn (or raise with require_full_fhe).
    Where each value keeps the batch comes from the ops' batch rules (`lowering.batch`); a
    partition's inputs and outputs must hold it batch-major on dim 0.
    """
    target = {node: group for group in groups for node in group.nodes}
    left_in_torch: List[TorchNode] = []
    supported_by_group: Dict[str, List[fx.Node]] = {g.key: [] for g in groups}
    layouts = batch_layouts(graph_module)
    for node in graph_module.graph.nodes:
        if not _is_compute(node):
            continue
        group = target.get(node)
        reason = "not in a module marked for FHE" if group is None else _reason(node, layouts)
        if reason is None:
            supported_by_group[group.key].append(node)
        else:
            left_in_torch.append(_left(node, reason))
    while True:
        proposals = _proposals(graph_module, groups, supported_by_group)
        misplaced = _misplaced_batch(graph_module, proposals, layouts)
        if not misplaced:
            break
        for node, reason in misplaced.items():
            group = target[node]
            supported_by_group[group.key].remove(node)
            left_in_torch.append(_left(node, reason))
    order = {node: i for i, node in enumerate(graph_module.graph.nodes)}
    left_in_torch.sort(key=lambda record: order.get(record.node, 0))
    private = [
        r
        for r in left_in_torch
        if target.get(r.node) is not None and not isinstance(layouts.get(r.node), SizedConstant)
    ]
    for records in _grouped(private):
        record = records[0]
        if target[record.node].settings.require_full_fhe:
            raise UnsupportedOpError(
                f"cannot run in FHE: {record}. Rewrite this op, or drop require_full_fhe to run it in torch"
            )
        more = (
            f" (and {len(records) - 1} more ops of '{record.module}' for the same reason)"
            if len(records) > 1
            else ""
        )
        warnings.warn(
            f"fhe_backend: running in torch instead of FHE: {record}{more}. {clear_values_note(record.node)}",
            stacklevel=2,
        )
    _warn_size_cuts(graph_module, proposals)
    for _, nodes in proposals:
        _own_constants(graph_module, nodes)
    fused = fuse_by_partitions(graph_module, [nodes for _, nodes in proposals], prefix=PARTITION_PREFIX)
    partitions = []
    for index, (group, _) in enumerate(proposals):
        name = f"{PARTITION_PREFIX}{index}"
        sub = getattr(fused, name)
        call = next(n for n in fused.graph.nodes if n.op == "call_module" and n.target == name)
        status = [
            input_status.get(arg.name, "encrypted") if isinstance(arg, fx.Node) else "encrypted"
            for arg in call.args
            if _is_tensor_arg(arg)
        ]
        wrapper = FhePartition(name, sub, group.settings, status, group.key)
        setattr(fused, name, wrapper)
        partitions.append(wrapper)
    fused.recompile()
    return fused, partitions, left_in_torch


def _warn_size_cuts(graph_module: fx.GraphModule, proposals) -> None:
    """Warn where sizes read from a partition's tensor (`sym_size`s the pass
    `sizes_from_inputs` could not rebuild from the inputs) feed a later partition: they are
    computed in torch, so the FHE region is cut in two circuits there, with a decryption
    between them, although no op of it runs in torch."""
    owner = {node: index for index, (_, nodes) in enumerate(proposals) for node in nodes}
    cuts: Dict[fx.Node, List[str]] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node in owner or _is_compute(node):
            continue
        sources = [arg for arg in node.all_input_nodes if arg in owner]
        reached, stack = set(), list(node.users)
        while sources and stack:
            user = stack.pop()
            if user in owner:
                reached.add(owner[user])
            elif user.op == "call_function" and not _is_compute(user):
                stack.extend(user.users)
        if reached - {owner[arg] for arg in sources}:
            cuts.setdefault(sources[0], []).append(f"'{node.name}' = {node.meta.get('val')}")
    for source, sizes in cuts.items():
        warnings.warn(
            f"fhe_backend: the FHE region is cut after '{source.name}'{where(source)}: the size(s) "
            f"{', '.join(sizes)} read from it are computed in torch, so the region runs as "
            "separate circuits with a decryption between them. Compile with static shapes "
            "(torch.compile(..., dynamic=False), after torch._dynamo.reset()) to keep it whole",
            stacklevel=3,
        )


def _grouped(records: List[TorchNode]) -> List[List[TorchNode]]:
    """Records of one module left in torch for one reason, together (one warning each)."""
    groups: Dict[Tuple[str, str], List[TorchNode]] = {}
    for record in records:
        groups.setdefault((record.module, record.reason), []).append(record)
    return list(groups.values())


def clear_values_note(node: fx.Node) -> str:
    """What leaves the encrypted domain when `node` runs in torch (the privacy cost)."""
    inputs = [arg.name for arg in node.all_input_nodes if arg.op != "get_attr"]
    read = f"the values it reads ({', '.join(repr(n) for n in inputs)})" if inputs else "its inputs"
    return (
        f"Privacy: the activations are in the clear at this point: {read} are decrypted (or "
        f"never encrypted) for this op, and its output '{node.name}' is plaintext until it "
        "enters an FHE partition again; not only slower"
    )


def batch_layouts(graph_module: fx.GraphModule) -> Dict[fx.Node, Optional[Layout]]:
    """Where each value of the graph keeps the batch (`BatchAt`), or why it holds none
    (`MixesSamples`); None for clear constants (weights, values computed from them only).

    Tensor inputs hold the batch batch-major on dim 0; 0-d inputs are one value for the whole
    batch. The layout is also stored in each node's `meta["fhe_batch"]` for the lowerings.
    """
    layouts: Dict[fx.Node, Optional[Layout]] = {}
    for node in graph_module.graph.nodes:
        node.meta.pop("fhe_batch", None)
        if node.op == "placeholder":
            layouts[node] = (
                MixesSamples("is a 0-d input, one value for the whole batch")
                if _is_scalar(node)
                else BATCH_MAJOR
                if _is_tensor_arg(node)
                else None
            )
        elif node.op == "call_function" and _holds_tensors(node):
            layouts[node] = _layout(node, layouts)
        else:
            layouts[node] = None
        if isinstance(layouts[node], BatchAt):
            node.meta["fhe_batch"] = layouts[node]
    return layouts


def _holds_tensors(node: fx.Node) -> bool:
    """False for sizes (SymInt nodes such as sym_size) and other non-tensor values: like
    constants, they hold no batch."""
    value = node.meta.get("val")
    values = value if isinstance(value, (tuple, list)) else [value]
    return any(isinstance(v, torch.Tensor) for v in values)


def _layout(node: fx.Node, layouts: Dict[fx.Node, Optional[Layout]]) -> Optional[Layout]:
    """A node's layout from its inputs'. Values of the whole batch (computed across samples in
    torch) broadcast onto per-sample ones like constants: the result keeps the batch."""
    inputs = {arg: layouts.get(arg) for arg in node.all_input_nodes}
    batched = {arg: layout for arg, layout in inputs.items() if isinstance(layout, BatchAt)}
    whole = next((arg for arg, layout in inputs.items() if isinstance(layout, MixesSamples)), None)
    if not batched:
        if whole is not None:
            return MixesSamples(f"reads '{whole.name}', one value for the whole batch")
        if any(isinstance(arg.meta.get("val"), torch.SymInt) for arg in inputs):
            return _sized_constant(node)
        return None
    if _is_scalar(node):
        return MixesSamples("gives a 0-d value, which has no batch dim")
    return batch_layout(node, batched)


def _recurrent_module(node: fx.Node) -> str:
    """The path of the recurrent layer (nn.RNN / nn.GRU / nn.LSTM) the node comes from, or ''."""
    for path, cls in module_paths(node):
        name = (
            cls
            if isinstance(cls, str)
            else f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', '')}"
        )
        if (
            isinstance(cls, type)
            and issubclass(cls, torch.nn.RNNBase)
            or name.endswith(
                ("torch.nn.modules.rnn.RNN", "torch.nn.modules.rnn.GRU", "torch.nn.modules.rnn.LSTM")
            )
        ):
            return path or "(model)"
    return ""


def _sized_constant(node: fx.Node) -> Layout:
    """The layout of a constant shaped by the symbolic batch size (batch-major when its dim 0 is
    the batch)."""
    value, batch = node.meta.get("val"), graph_batch(node.graph)
    if isinstance(value, torch.Tensor) and value.dim() and batch is not None:
        first = value.shape[0]
        expr = getattr(getattr(first, "node", None), "expr", first)
        if expr == batch:
            return SizedConstant(0, 1)
    return MixesSamples("is a constant shaped by the batch size without the batch on dim 0")


def _reason(node: fx.Node, layouts: Dict[fx.Node, Optional[Layout]]) -> Optional[str]:
    """Why a target node cannot run in FHE (None when it can)."""
    if isinstance(layouts.get(node), SizedConstant):
        return (
            "a constant shaped by the symbolic batch size: computed in torch (no private "
            "data), it enters the FHE partition as an input"
        )
    recurrent = _recurrent_module(node)
    if recurrent:
        return (
            f"part of the recurrent layer '{recurrent}' (captured with "
            "torch._dynamo.config.allow_rnn): its time steps stay in torch"
        )
    for arg in node.all_input_nodes:
        layout = layouts.get(arg)
        if isinstance(layout, MixesSamples):
            return (
                f"its input '{arg.name}' is one value for the whole batch (computed across "
                f"samples in torch); {ONE_SAMPLE_AT_A_TIME}"
            )
    layout = layouts.get(node)
    if isinstance(layout, MixesSamples):
        return layout.reason(node)
    return unsupported_reason(node)


def _left(node: fx.Node, reason: str) -> TorchNode:
    return TorchNode(node.name, op_name(node), module_path(node), reason, source_line(node), node=node)


def _proposals(
    graph_module: fx.GraphModule, groups: Sequence[TargetGroup], supported_by_group: Dict[str, List[fx.Node]]
) -> List[Tuple[TargetGroup, Dict[fx.Node, None]]]:
    proposals: List[Tuple[TargetGroup, Dict[fx.Node, None]]] = []
    for group in groups:
        nodes = supported_by_group[group.key]
        if not nodes:
            continue
        partitioner = CapabilityBasedPartitioner(
            graph_module, _InTarget(nodes), allows_single_node_partition=True
        )
        for proposal in partitioner.propose_partitions():
            proposals.append((group, dict.fromkeys(proposal.nodes)))
    order = {node: i for i, node in enumerate(graph_module.graph.nodes)}
    proposals.sort(key=lambda item: min(order[n] for n in item[1]))
    return proposals


def _misplaced_batch(graph_module: fx.GraphModule, proposals, layouts) -> Dict[fx.Node, str]:
    """Nodes on a partition's boundary whose value does not hold the batch batch-major on dim 0
    (the runtime splits partition inputs and outputs into samples along it)."""
    misplaced: Dict[fx.Node, str] = {}
    for _, nodes in proposals:
        for node in nodes:
            for arg in node.all_input_nodes:
                layout = layouts.get(arg)
                if arg not in nodes and isinstance(layout, BatchAt) and not layout.major:
                    misplaced[node] = (
                        f"its input '{arg.name}' comes from torch with the batch at "
                        f"{layout}; a partition's inputs need it batch-major on dim 0"
                    )
            layout = layouts.get(node)
            if (
                isinstance(layout, BatchAt)
                and not layout.major
                and any(user not in nodes for user in node.users)
            ):
                misplaced[node] = (
                    f"its value, with the batch at {layout}, would leave the FHE "
                    "partition; a partition's outputs need it batch-major on dim 0"
                )
    return misplaced


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
