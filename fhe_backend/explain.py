"""`fhe_backend.explain` and the `fhe-backend explain` command: what of a model runs in FHE.

The model is captured, partitioned, calibrated and its circuits compiled exactly as
``torch.compile(model, backend="fhe")`` would, but no keys are generated and nothing is
encrypted. The report lists, per FHE partition, its ops, input/output shapes, bit-widths, PBS
count and complexity; every compute node left in torch with its reason; the coverage by op
count and by compute (multiply-accumulates of matmuls and convolutions); dynamo's graph breaks (reason and source line);
and, when no graph of the model reached the backend at all (dynamo skipped the frame, e.g. an
`nn.LSTM`), why, and what to do.
"""

from __future__ import annotations

import argparse
import importlib
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch

from .errors import OptionError
from .graph_utils import output_nodes
from .partition import TorchNode, _is_compute
from .quantization.calibration import batches
from .runtime import FhePartition
from .settings import MIN_RECOMMENDED_INPUTSET


@dataclass
class PartitionReport:
    """One FHE partition: what it computes and what its circuit costs."""

    name: str
    module: str
    ops: Dict[str, int]
    input_shapes: List[Tuple[int, ...]]
    output_shapes: List[Tuple[int, ...]]
    max_bit_width: int
    max_tlu_bit_width: int
    pbs_count: int
    complexity: float
    macs: int = 0

    @property
    def compute_ops(self) -> int:
        """Number of compute nodes in the partition."""
        return sum(self.ops.values())


@dataclass
class GraphBreak:
    """Where dynamo split the model into several graphs (each calibrated on its own inputs)."""

    reason: str
    source: str = ""

    def __str__(self) -> str:
        return f"{self.reason}" + (f" at {self.source}" if self.source else "")


@dataclass
class ExplainReport:
    """What runs in FHE and what stays in torch, and why. `str(report)` is a table."""

    partitions: List[PartitionReport]
    torch_nodes: List[TorchNode]
    samples: int
    warnings: List[str] = field(default_factory=list)
    fhe_modules: List[FhePartition] = field(default_factory=list, repr=False)
    graph_breaks: List[GraphBreak] = field(default_factory=list)
    graph_count: int = 1
    not_captured: str = ""
    torch_macs: int = 0

    @property
    def fhe_macs(self) -> int:
        """Multiply-accumulates of the FHE partitions (matmuls, convolutions), traced batch."""
        return sum(p.macs for p in self.partitions)

    @property
    def compute_coverage(self) -> float:
        """Share of the model's multiply-accumulates that run in FHE (0 to 1)."""
        total = self.fhe_macs + self.torch_macs
        return self.fhe_macs / total if total else 0.0

    @property
    def fhe_ops(self) -> int:
        """Compute nodes running in FHE."""
        return sum(p.compute_ops for p in self.partitions)

    @property
    def coverage(self) -> float:
        """Share of the compute nodes that run in FHE (0 to 1)."""
        total = self.fhe_ops + len(self.torch_nodes)
        return self.fhe_ops / total if total else 0.0

    def reasons(self) -> Dict[str, int]:
        """How many nodes stay in torch for each reason."""
        return dict(Counter(node.reason for node in self.torch_nodes))

    def __str__(self) -> str:
        lines = [
            f"FHE coverage: {self.coverage:.0%} of compute ops ({self.fhe_ops} in FHE, "
            f"{len(self.torch_nodes)} in torch), {self.compute_coverage:.0%} of the compute "
            f"({_count(self.fhe_macs)} of {_count(self.fhe_macs + self.torch_macs)} "
            f"multiply-accumulates); inputset: {self.samples} samples",
            "",
        ]
        if self.not_captured:
            lines += [f"NOTHING RUNS IN FHE: {self.not_captured}", ""]
        if self.graph_breaks:
            lines += [
                f"{len(self.graph_breaks)} graph break(s): dynamo split the model into "
                f"{self.graph_count} graphs, each calibrated on the values that reach it"
            ]
            lines += [f"  - {b}" for b in self.graph_breaks] + [""]
        if self.partitions:
            lines += _table(
                [
                    "partition",
                    "module",
                    "inputs",
                    "outputs",
                    "max bits",
                    "TLU bits",
                    "PBS",
                    "complexity",
                    "ops",
                ],
                [
                    [
                        p.name,
                        p.module or "(model)",
                        _shapes(p.input_shapes),
                        _shapes(p.output_shapes),
                        p.max_bit_width,
                        p.max_tlu_bit_width,
                        p.pbs_count,
                        f"{p.complexity:.3g}",
                        ", ".join(f"{op} x{n}" if n > 1 else op for op, n in p.ops.items()),
                    ]
                    for p in self.partitions
                ],
            )
        else:
            lines.append("no FHE partition")
        if self.torch_nodes:
            lines += ["", "left in torch (activations in the clear there):"]
            groups: Dict[Tuple[str, str], List[TorchNode]] = {}
            for node in self.torch_nodes:
                groups.setdefault((node.module, node.reason), []).append(node)
            rows = []
            for nodes in groups.values():
                if len(nodes) <= 3:
                    rows += [[n.name, n.op, n.module or "(model)", n.reason, n.source or "-"] for n in nodes]
                    continue
                ops = Counter(_short_op(n.op) for n in nodes)
                rows.append(
                    [
                        f"{len(nodes)} nodes",
                        ", ".join(f"{op} x{k}" for op, k in ops.most_common(4))
                        + (", ..." if len(ops) > 4 else ""),
                        nodes[0].module or "(model)",
                        nodes[0].reason,
                        nodes[0].source or "-",
                    ]
                )
            lines += _table(["node", "op", "module", "reason", "source"], rows)
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _count(value: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return str(value)


def _shape(node: Any) -> Tuple[int, ...]:
    value = node.meta.get("val") if hasattr(node, "meta") else None
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    if not isinstance(value, torch.Tensor):
        return ()
    return tuple(_size(d) for d in value.shape)


def _size(dim: Any) -> int:
    try:
        return int(dim)
    except (TypeError, ValueError):  # a symbolic size: its traced hint
        return int(getattr(getattr(dim, "node", None), "hint", None) or 1)


def _numel(node: Any) -> int:
    return math.prod(_shape(node)) if isinstance(node, torch.fx.Node) else 0


def node_macs(node: torch.fx.Node) -> int:
    """Multiply-accumulates of one graph node on its traced shapes (0 for ops without any:
    element-wise ops, data movement)."""
    target = node.target
    aten = torch.ops.aten
    if target in (aten.mm.default, aten.bmm.default):
        return _numel(node) * _shape(node.args[0])[-1]
    if target is aten.addmm.default:
        return _numel(node) * _shape(node.args[1])[-1]
    if target is aten.convolution.default:
        weight = _shape(node.args[1])
        return _numel(node) * math.prod(weight[1:]) if weight else 0
    return 0


def _shapes(shapes: List[Tuple[int, ...]]) -> str:
    return " ".join("x".join(str(d) for d in shape) for shape in shapes)


def _table(header: List[str], rows: List[List[Any]]) -> List[str]:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    render = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return [render(cells[0]), render(["-" * w for w in widths])] + [render(r) for r in cells[1:]]


def _short_op(target: Any) -> str:
    name = str(target)
    return name.split(".")[1] if name.startswith("aten.") else name


def partition_report(partition: FhePartition) -> PartitionReport:
    """The report of one compiled partition (its statistics need no keys)."""
    statistics = partition.statistics
    graph = partition.graph_module.graph
    ops = Counter(_short_op(node.target) for node in graph.nodes if _is_compute(node))
    input_shapes = [tuple(s) for s in statistics["input_shape"]]
    first_input = partition.program.tensor_inputs[0].name
    rows_ratio = partition.rows_per_sample[0] / partition.stats[first_input].shape[0]
    outputs = output_nodes(graph)
    output_shapes = []
    for node in outputs:
        shape = partition.stats[node.name].shape
        output_shapes.append((max(1, round(shape[0] * rows_ratio)), *shape[1:]) if shape else ())
    macs = sum(node_macs(node) for node in graph.nodes if node.op == "call_function")
    return PartitionReport(
        partition.name,
        partition.module_path,
        dict(ops),
        input_shapes,
        output_shapes,
        statistics["max_bit_width"],
        statistics["max_tlu_bit_width"],
        statistics["pbs_count"],
        statistics["complexity"],
        macs,
    )


def explain(model: torch.nn.Module, inputset: Any, **options: Any) -> ExplainReport:
    """Capture, partition, calibrate and compile `model` (no keys); report what runs in FHE.

    `options` are the backend's options (n_bits, rounding_threshold_bits, module_names, ...).
    Warns when the inputset has fewer than 100 samples. Graph breaks are reported with their
    reason and source line; with a break, each graph is calibrated on the values that reach it
    when the model runs on the inputset's first batch. When no graph reaches the backend (dynamo
    skipped the frame), the report says why instead of showing an empty table.
    """
    from .backend import compiled_graphs

    if "inputset" in options:
        raise OptionError("explain(model, inputset, ...) takes the inputset as its own argument")
    samples_batches = batches(inputset)
    samples = sum(int(b[0].shape[0]) if b[0].dim() else 1 for b in samples_batches)
    notes = []
    if samples < MIN_RECOMMENDED_INPUTSET:
        notes.append(
            f"the inputset has {samples} samples (< {MIN_RECOMMENDED_INPUTSET}): "
            "calibration ranges may miss values, a common cause of accuracy loss"
        )
        warnings.warn(f"fhe_backend.explain: {notes[-1]}", stacklevel=2)
    target = getattr(model, "_orig_mod", model)
    was_training = target.training
    target.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph_count, breaks = capture_summary(target, samples_batches[0])
            not_captured = _why_not_captured(target, samples_batches[0]) if graph_count == 0 else ""
            # one graph: calibrated on the whole inputset; several: each graph on what reaches it
            run_options = {"fhe": "disable", **options}
            if graph_count <= 1:
                run_options["inputset"] = inputset
            torch._dynamo.reset()
            compiled = torch.compile(target, backend="fhe", options=run_options)
            compiled(*samples_batches[0])
    finally:
        target.train(was_training)
    graphs = compiled_graphs(compiled) if graph_count else []
    modules = [p for graph in graphs for p in graph.partitions]
    torch_nodes = [node for graph in graphs for node in graph.left_in_torch]
    torch_macs = sum(node_macs(n.node) for n in torch_nodes if n.node is not None)
    return ExplainReport(
        [partition_report(p) for p in modules],
        torch_nodes,
        samples,
        notes,
        modules,
        breaks,
        graph_count,
        not_captured,
        torch_macs,
    )


def capture_summary(model: torch.nn.Module, inputs: Tuple[torch.Tensor, ...]) -> Tuple[int, List[GraphBreak]]:
    """(number of graphs dynamo captures, its graph breaks) for one call of `model`."""
    summary = torch._dynamo.explain(model)(*inputs)
    breaks = []
    for item in summary.break_reasons:
        frames = [f for f in item.user_stack if "torch/" not in f.filename]
        frame = (frames or item.user_stack or [None])[-1]
        where = f"{frame.filename}:{frame.lineno}" if frame is not None else ""
        breaks.append(GraphBreak(_first_line(item.reason), where))
    return summary.graph_count, breaks


def _why_not_captured(model: torch.nn.Module, inputs: Tuple[torch.Tensor, ...]) -> str:
    """Why dynamo captured no graph of the model: what `fullgraph=True` reports."""
    torch._dynamo.reset()
    try:
        torch.compile(model, backend="eager", fullgraph=True)(*inputs)
        reason, where = "dynamo skipped every frame of the model", ""
    except Exception as error:  # noqa: BLE001 - the message is what we report
        text = str(error)
        reason = _first_line(text)
        found = re.findall(r'File "([^"]+)", line (\d+)', text.split("from user code:")[-1])
        where = f" at {found[-1][0]}:{found[-1][1]}" if found else ""
    hint = (
        "; set torch._dynamo.config.allow_rnn = True to capture it (the RNN op then stays in "
        "torch, in the clear, and the layers around it can run in FHE)"
        if re.search(r"\b(RNN|GRU|LSTM)\b", reason)
        else ""
    )
    return (
        f"no graph of this model reached the fhe backend: dynamo skipped the frame "
        f"({reason}{where}), so the whole model runs as eager torch, in the clear{hint}. "
        "Compile with torch.compile(model, backend='fhe', fullgraph=True) to see the break"
    )


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), str(text))


# ---- the `fhe-backend explain` command --------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fhe-backend explain`."""
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="'package.module:factory' returning an nn.Module (default: the built-in digits MLP demo model)",
    )
    parser.add_argument(
        "--inputset",
        default=None,
        help=".npy/.pt file of representative inputs (default for the demo model: digits)",
    )
    parser.add_argument("--n-bits", type=int, default=None, help="option n_bits")
    parser.add_argument(
        "--rounding-threshold-bits", type=int, default=None, help="option rounding_threshold_bits"
    )
    parser.add_argument(
        "--module-names", nargs="*", default=None, help="option module_names: only these modules run in FHE"
    )


def _load_factory(spec: str) -> torch.nn.Module:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise OptionError(f"model {spec!r}: expected 'package.module:factory'")
    factory = getattr(importlib.import_module(module_name), attribute)
    model = factory() if not isinstance(factory, torch.nn.Module) else factory
    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"model {spec!r} gave a {type(model).__name__}, not an nn.Module")
    return model


def _load_inputset(path: str) -> torch.Tensor:
    if path.endswith(".npy"):
        import numpy as np

        return torch.from_numpy(np.load(path)).float()
    data = torch.load(path)
    return data.float() if isinstance(data, torch.Tensor) and data.is_floating_point() else data


def run(args: argparse.Namespace) -> int:
    """Print the explain report of a model (or of the built-in demo model)."""
    if args.model is None:
        from .demo import DigitsMLP, load_digits_split

        model = DigitsMLP()
        inputset = load_digits_split()[0] if args.inputset is None else _load_inputset(args.inputset)
    else:
        if args.inputset is None:
            raise OptionError("--inputset FILE is required with a model")
        model, inputset = _load_factory(args.model), _load_inputset(args.inputset)
    options = {
        "n_bits": args.n_bits,
        "rounding_threshold_bits": args.rounding_threshold_bits,
        "module_names": args.module_names,
    }
    report = explain(model, inputset, **{k: v for k, v in options.items() if v is not None})
    print(report)
    return 0
