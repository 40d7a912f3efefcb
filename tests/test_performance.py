"""Issue-9 optimizations keep results correct: rounding methods, "auto" precision, sharing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fhe_backend
from tests.harness import compile_fhe, quantization_tolerance


@pytest.fixture(scope="module")
def mlp_and_data():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4)).eval()
    return model, torch.randn(400, 16), torch.randn(40, 16)


def _compile(model, inputset, rounding):
    compiled = compile_fhe(model, inputset, n_bits=6, rounding_threshold_bits=rounding)
    with torch.no_grad():
        compiled(inputset[:1])
    (partition,) = fhe_backend.partitions(compiled)
    return compiled, partition


def _error(compiled, model, x):
    with torch.no_grad():
        return float((compiled(x) - model(x)).abs().max())


def test_approximate_rounding_is_one_lookup_per_activation(mlp_and_data):
    model, inputset, x = mlp_and_data
    exact, exact_partition = _compile(model, inputset, 5)
    approximate, approximate_partition = _compile(model, inputset, {"n_bits": 5, "method": "approximate"})
    activations = 24 + 24
    assert approximate_partition.statistics["pbs_count"] == activations
    assert exact_partition.statistics["pbs_count"] > activations  # exact rounding costs extra bootstraps
    assert approximate_partition.statistics["complexity"] < exact_partition.statistics["complexity"]
    with torch.no_grad():
        tolerance = quantization_tolerance(model(x), 5, steps=8)
    assert _error(approximate, model, x) <= tolerance


def test_auto_rounding_lowers_lookups_within_its_error_budget(mlp_and_data):
    model, inputset, x = mlp_and_data
    unrounded, unrounded_partition = _compile(model, inputset, None)
    auto, auto_partition = _compile(model, inputset, "auto")
    lsbs = auto_partition.program.rounding_lsbs
    assert lsbs and all(v > 0 for v in lsbs.values())
    assert auto_partition.statistics["max_tlu_bit_width"] < unrounded_partition.statistics["max_tlu_bit_width"]
    with torch.no_grad():
        reference, rounded = unrounded(x), auto(x)
    span = float(reference.max() - reference.min())
    assert float((rounded - reference).abs().mean()) <= 0.02 * span


def test_per_channel_weights_are_more_accurate_than_per_tensor():
    torch.manual_seed(4)
    model = nn.Linear(16, 4).eval()
    with torch.no_grad():
        model.weight[0] *= 20  # one output channel with much larger weights than the others
    inputset, x = torch.randn(300, 16), torch.randn(40, 16)
    errors = {}
    for per_channel in (True, False):
        compiled = compile_fhe(model, inputset, n_bits=4, per_channel_weights=per_channel)
        with torch.no_grad():
            errors[per_channel] = float((compiled(x) - model(x))[:, 1:].abs().max())
    assert errors[True] < errors[False] / 2


def test_recompilation_for_a_new_batch_size_shares_the_circuit(mlp_and_data):
    model, inputset, _ = mlp_and_data
    compiled, partition = _compile(model, inputset, 6)
    circuit = partition.circuit
    with torch.no_grad():
        for batch in (2, 5, 9):
            assert compiled(inputset[:batch]).shape == (batch, 4)
    partitions = fhe_backend.partitions(compiled)
    assert len(partitions) == 1 and partitions[0].circuit is circuit
