"""`fhe_backend.explain` and the `fhe-backend explain` command: what of a model runs in FHE.

The model is captured, partitioned, calibrated and its circuits compiled exactly as
``torch.compile(model, backend="fhe")`` would, but no keys are generated and nothing is
encrypted. The report lists, per FHE partition, its ops, input/output shapes, bit-widths, PBS
count and complexity; every compute node left in torch with its reason; and the coverage.
"""

from __future__ import annotations

import argparse
import importlib
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch

from .errors import OptionError
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

    @property
    def compute_ops(self) -> int:
        """Number of compute nodes in the partition."""
        return sum(self.ops.values())


@dataclass
class ExplainReport:
    """What runs in FHE and what stays in torch, and why. `str(report)` is a table."""

    partitions: List[PartitionReport]
    torch_nodes: List[TorchNode]
    samples: int
    warnings: List[str] = field(default_factory=list)
    fhe_modules: List[FhePartition] = field(default_factory=list, repr=False)

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
        lines = [f"FHE coverage: {self.coverage:.0%} of compute ops ({self.fhe_ops} in FHE, "
                 f"{len(self.torch_nodes)} in torch); inputset: {self.samples} samples", ""]
        if self.partitions:
            lines += _table(
                ["partition", "module", "inputs", "outputs", "max bits", "TLU bits", "PBS",
                 "complexity", "ops"],
                [[p.name, p.module or "(model)", _shapes(p.input_shapes), _shapes(p.output_shapes),
                  p.max_bit_width, p.max_tlu_bit_width, p.pbs_count, f"{p.complexity:.3g}",
                  ", ".join(f"{op} x{n}" if n > 1 else op for op, n in p.ops.items())]
                 for p in self.partitions])
        else:
            lines.append("no FHE partition")
        if self.torch_nodes:
            lines += ["", "left in torch:"]
            lines += _table(["node", "op", "module", "reason", "source"],
                            [[n.name, n.op, n.module or "(model)", n.reason, n.source or "-"]
                             for n in self.torch_nodes])
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


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
    output_node = next(n for n in graph.nodes if n.op == "output")
    outputs = output_node.args[0] if isinstance(output_node.args[0], (tuple, list)) else [
        output_node.args[0]]
    output_shapes = []
    for node in outputs:
        shape = partition.stats[node.name].shape
        output_shapes.append((max(1, round(shape[0] * rows_ratio)), *shape[1:]) if shape else ())
    return PartitionReport(partition.name, partition.module_path, dict(ops), input_shapes,
                           output_shapes, statistics["max_bit_width"],
                           statistics["max_tlu_bit_width"], statistics["pbs_count"],
                           statistics["complexity"])


def explain(model: torch.nn.Module, inputset: Any, **options: Any) -> ExplainReport:
    """Capture, partition, calibrate and compile `model` (no keys); report what runs in FHE.

    `options` are the backend's options (n_bits, rounding_threshold_bits, module_names, ...).
    Warns when the inputset has fewer than 100 samples.
    """
    from .backend import compiled_graphs

    if "inputset" in options:
        raise OptionError("explain(model, inputset, ...) takes the inputset as its own argument")
    samples_batches = batches(inputset)
    samples = sum(int(b[0].shape[0]) if b[0].dim() else 1 for b in samples_batches)
    notes = []
    if samples < MIN_RECOMMENDED_INPUTSET:
        notes.append(f"the inputset has {samples} samples (< {MIN_RECOMMENDED_INPUTSET}): "
                     "calibration ranges may miss values, a common cause of accuracy loss")
        warnings.warn(f"fhe_backend.explain: {notes[-1]}", stacklevel=2)
    options = {"fhe": "disable", **options, "inputset": inputset}
    target = getattr(model, "_orig_mod", model)
    compiled = torch.compile(target, backend="fhe", options=options)
    was_training = target.training
    target.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled(*samples_batches[0])
    finally:
        target.train(was_training)
    graphs = compiled_graphs(compiled)
    modules = [p for graph in graphs for p in graph.partitions]
    torch_nodes = [node for graph in graphs for node in graph.left_in_torch]
    return ExplainReport([partition_report(p) for p in modules], torch_nodes, samples, notes,
                         modules)


# ---- the `fhe-backend explain` command --------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fhe-backend explain`."""
    parser.add_argument("model", nargs="?", default=None,
                        help="'package.module:factory' returning an nn.Module (default: the "
                             "built-in digits MLP demo model)")
    parser.add_argument("--inputset", default=None,
                        help=".npy/.pt file of representative inputs (default for the demo model: "
                             "digits)")
    parser.add_argument("--n-bits", type=int, default=None, help="option n_bits")
    parser.add_argument("--rounding-threshold-bits", type=int, default=None,
                        help="option rounding_threshold_bits")
    parser.add_argument("--module-names", nargs="*", default=None,
                        help="option module_names: only these modules run in FHE")


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
    options = {"n_bits": args.n_bits, "rounding_threshold_bits": args.rounding_threshold_bits,
               "module_names": args.module_names}
    report = explain(model, inputset, **{k: v for k, v in options.items() if v is not None})
    print(report)
    return 0
