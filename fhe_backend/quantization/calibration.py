"""Calibration: run the float graph on the inputset and record every tensor's range."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Tuple

import torch
import torch.fx as fx


@dataclass
class NodeStats:
    """Range of one node's float output over the inputset, and its recorded shape."""

    low: float
    high: float
    shape: Tuple[int, ...]
    integral: bool = False

    def merge(self, other: "NodeStats") -> "NodeStats":
        """Union of two ranges (the shape of the first batch is kept)."""
        return NodeStats(
            min(self.low, other.low), max(self.high, other.high), self.shape, self.integral and other.integral
        )


def tensor_stats(value: torch.Tensor) -> NodeStats:
    """Statistics of one tensor."""
    integral = not value.is_floating_point()
    if value.numel() == 0:
        return NodeStats(0.0, 0.0, tuple(value.shape), integral)
    low, high = (
        torch.aminmax(value.detach().reshape(-1)) if value.dtype != torch.bool else (value.min(), value.max())
    )
    return NodeStats(float(low), float(high), tuple(value.shape), integral)


class StatsRecorder(fx.Interpreter):
    """Runs a graph in float and merges each tensor node's range into `stats`."""

    def __init__(self, module: fx.GraphModule, stats: Dict[str, NodeStats]):
        super().__init__(module)
        self.stats = stats

    def run_node(self, n: fx.Node) -> Any:
        """Run the node and record the range of its tensor result."""
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            record(self.stats, n.name, result)
        return result


def record(stats: Dict[str, NodeStats], name: str, value: torch.Tensor) -> None:
    """Merge one tensor's statistics into `stats[name]`."""
    new = tensor_stats(value)
    stats[name] = stats[name].merge(new) if name in stats else new


def batches(inputset: Any) -> List[Tuple[torch.Tensor, ...]]:
    """Normalize an inputset: a tensor, a tuple of tensors (one per input), or an iterable of
    batches (each a tensor or a tuple). Numpy arrays are accepted in place of tensors."""
    if isinstance(inputset, (torch.Tensor,)) or _is_array(inputset):
        return [(_tensor(inputset),)]
    if isinstance(inputset, tuple) and all(isinstance(x, torch.Tensor) or _is_array(x) for x in inputset):
        return [tuple(_tensor(x) for x in inputset)]
    result = []
    for batch in _iterate(inputset):
        if isinstance(batch, (list, tuple)):
            result.append(tuple(_tensor(x) for x in batch))
        else:
            result.append((_tensor(batch),))
    if not result:
        raise ValueError("the inputset is empty: give at least one batch of representative inputs")
    return result


def _iterate(inputset: Iterable) -> Iterable:
    try:
        return iter(inputset)
    except TypeError as error:
        raise ValueError(
            f"inputset of type {type(inputset).__name__}: expected a tensor, a tuple of tensors "
            "(one per input) or an iterable of batches"
        ) from error


def _is_array(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "shape")


def _tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    tensor = torch.as_tensor(value)
    return tensor.float() if tensor.is_floating_point() else tensor
