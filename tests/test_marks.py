"""Module marks (decorator and `module_names`) and partitioning into FHE subgraphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fhe_backend
from fhe_backend import fhe_module
from tests.harness import compile_fhe, quantization_tolerance

N_BITS = 5


@fhe_module
class MarkedBlock(nn.Module):
    """Linear + ReLU, marked for FHE by the bare class decorator."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return torch.relu(self.linear(x))


@fhe_module(n_bits=4, rounding_threshold_bits=5)
class MarkedWithOptions(MarkedBlock):
    """The same block, marked with its own options."""


class Sandwich(nn.Module):
    """first (torch) -> middle (FHE when marked) -> last (torch)."""

    def __init__(self, middle: nn.Module):
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.middle = middle
        self.last = nn.Linear(8, 3)

    def forward(self, x):
        return self.last(self.middle(torch.tanh(self.first(x))))


class TwoBlocks(nn.Module):
    """Two blocks separated by an unmarked linear layer."""

    def __init__(self, block_type=nn.Sequential):
        super().__init__()
        self.head = block_type()
        self.between = nn.Linear(8, 8)
        self.tail = block_type()

    def forward(self, x):
        return self.tail(self.between(self.head(x)))


def _plain_block() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU())


def _run(model: nn.Module, inputs: torch.Tensor, **options):
    model = model.eval()
    compiled = compile_fhe(model, inputs, n_bits=N_BITS, fhe="simulate", **options)
    with torch.no_grad():
        return compiled(inputs[:20]), model(inputs[:20]), fhe_backend.partitions(compiled)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, n_bits: int = N_BITS):
    tolerance = quantization_tolerance(expected, n_bits, steps=4.5 if n_bits >= 5 else 2)
    assert float((actual - expected).abs().max()) <= tolerance


def _fhe_modules(partitions):
    return sorted(p.module_path for p in partitions)


@pytest.fixture(scope="module")
def x6():
    torch.manual_seed(0)
    return torch.randn(120, 6)


def test_class_decorator_marks_only_that_module(x6):
    model = Sandwich(MarkedBlock())
    actual, expected, partitions = _run(model, x6)
    assert _fhe_modules(partitions) == ["middle"]
    ops = [str(n.target) for n in partitions[0].graph_module.graph.nodes if n.op == "call_function"]
    assert "aten.tanh.default" not in ops  # first's activation stays in torch
    _assert_close(actual, expected)


def test_sandwich_runs_middle_in_fhe_and_ends_in_torch(x6):
    model = Sandwich(_plain_block())
    actual, expected, partitions = _run(model, x6, module_names=["middle"])
    assert len(partitions) == 1 and partitions[0].module_path == "middle"
    graph = partitions[0].graph_module.graph
    assert sum(1 for n in graph.nodes if str(n.target) == "aten.addmm.default") == 1
    _assert_close(actual, expected)
    # the torch ends really run in torch: changing the last layer changes the compiled output
    with torch.no_grad():
        partitions[0].mode = "torch"
        compiled_torch = partitions[0](torch.tanh(model.first(x6[:20])))
    torch.testing.assert_close(compiled_torch, model.middle(torch.tanh(model.first(x6[:20]))))


def test_decorator_options_override_globals(x6):
    _, _, partitions = _run(Sandwich(MarkedWithOptions()), x6)
    settings = partitions[0].settings
    assert settings.n_bits.op_inputs == 4 and settings.rounding_threshold_bits.n_bits == 5
    assert partitions[0].statistics["max_tlu_bit_width"] <= 5


def test_instance_form_marks_one_instance(x6):
    model = Sandwich(_plain_block())
    fhe_module(model.middle, n_bits=4)
    actual, expected, partitions = _run(model, x6)
    assert _fhe_modules(partitions) == ["middle"]
    assert partitions[0].settings.n_bits.op_inputs == 4
    _assert_close(actual, expected, n_bits=4)
    # another instance of the same class is not marked
    _, _, others = _run(Sandwich(_plain_block()), x6)
    assert _fhe_modules(others) == [""]


@pytest.mark.parametrize("name", ["middle.0", "middle_0"])
def test_module_names_with_dot_or_underscore(x6, name):
    _, _, partitions = _run(Sandwich(_plain_block()), x6, module_names=[name])
    assert _fhe_modules(partitions) == ["middle.0"]
    ops = [str(n.target) for n in partitions[0].graph_module.graph.nodes if n.op == "call_function"]
    assert "aten.relu.default" not in ops  # middle.1 (the ReLU) is not marked


def test_unknown_module_name_is_an_error(x6):
    with pytest.raises(Exception, match="matches no module"):
        _run(Sandwich(_plain_block()), x6, module_names=["nowhere"])


def test_no_marks_whole_graph_is_the_target(x6):
    actual, expected, partitions = _run(Sandwich(_plain_block()), x6)
    assert len(partitions) == 1 and partitions[0].module_path == ""
    graph = partitions[0].graph_module.graph
    assert sum(1 for n in graph.nodes if str(n.target) == "aten.addmm.default") == 3
    _assert_close(actual, expected)


def test_two_marked_modules_give_two_partitions():
    torch.manual_seed(0)
    x = torch.randn(120, 8)
    model = TwoBlocks(_plain_block)
    actual, expected, partitions = _run(model, x, module_names=["head", "tail"])
    assert _fhe_modules(partitions) == ["head", "tail"]
    assert [p.name for p in partitions] == ["fhe_partition_0", "fhe_partition_1"]
    _assert_close(actual, expected)
