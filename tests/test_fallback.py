"""Unsupported operators: eager fallback with a precise warning, or a precise error.

- by default an unsupported node inside the FHE target stays eager torch, the model still gives
  the right answer, and the warning names the op, the module path and the source line;
- `require_full_fhe=True` raises `UnsupportedOpError` with the same information;
- a table lookup over Concrete's 16-bit limit raises `BitWidthError` (a ValueError) naming the
  node, its bit-width and the options that lower it, before Concrete is ever called.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn as nn

import fhe_backend
from tests.harness import assert_matches_torch, compile_fhe, find_cause, grid_inputs, quantization_tolerance


def _line_of(marker: str) -> int:
    with open(__file__) as source:
        return next(
            number for number, line in enumerate(source, 1) if marker in line and "_line_of" not in line
        )


class CumsumBlock(nn.Module):
    """A block whose cumulative sum has no FHE lowering."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        hidden = torch.relu(self.linear(x))
        return torch.cumsum(hidden, dim=-1) * 0.5  # marker: unsupported op


class Model(nn.Module):
    """Linear -> block (with the unsupported op) -> Linear."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.block = CumsumBlock()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.sigmoid(self.block(self.encoder(x))))


def _assert_names_op_module_and_line(message: str):
    assert "cumsum" in message
    assert "'block'" in message
    assert f"{os.path.basename(__file__)}:{_line_of('marker: unsupported op')}" in message


def test_fallback_warning_says_which_activations_are_in_the_clear():
    """The warning is about privacy, not only speed: the values the op reads leave the
    encrypted domain there, and its output is plaintext."""
    torch.manual_seed(0)
    model = Model().eval()
    inputset = torch.randn(100, 4)
    compiled = compile_fhe(model, inputset, n_bits=4, fhe="disable")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(inputset[:2])
    message = next(str(w.message) for w in caught if "instead of FHE" in str(w.message))
    assert "activations are in the clear" in message
    assert "'relu'" in message  # the value the cumsum reads (the block's ReLU output)
    assert "plaintext" in message and "'cumsum'" in message


def test_median_over_the_batch_runs_in_torch_and_the_rest_in_fhe():
    """torch.median(x, 0) has no lowering and changes dim 0: it mixes samples, so it runs in
    torch (decided from shapes, not from message text); x - median broadcasts that value of
    the whole batch onto each sample in torch; the ReLU after it runs in FHE."""
    fn = lambda x: torch.relu(x - torch.median(x, 0).values)  # noqa: E731
    inputset = torch.randn(100, 4)
    compiled = compile_fhe(fn, inputset, n_bits=6, fhe="simulate")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = compiled(inputset[:8])
    messages = [str(w.message) for w in caught if "instead of FHE" in str(w.message)]
    assert any("aten.median.dim" in m and "acts on dim 0" in m for m in messages), messages
    expected = fn(inputset[:8])
    assert float((actual - expected).abs().max()) <= quantization_tolerance(expected, 6)
    (partition,) = fhe_backend.partitions(compiled)
    assert "aten.relu.default" in {str(n.target) for n in partition.graph_module.graph.nodes}


def test_unsupported_op_falls_back_to_torch_with_a_warning():
    torch.manual_seed(0)
    model = Model().eval()
    inputset = torch.randn(100, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = assert_matches_torch(model, [inputset[:8]], inputset, n_bits=6, steps=6)
    messages = [str(w.message) for w in caught if "instead of FHE" in str(w.message)]
    assert len(messages) == 1, messages
    _assert_names_op_module_and_line(messages[0])
    # the FHE parts around the fallback are still FHE: before and after the cumsum
    assert len(fhe_backend.partitions(compiled)) == 2


def test_require_full_fhe_raises_unsupported_op_error():
    model = Model().eval()
    compiled = torch.compile(
        model, backend="fhe", options={"inputset": torch.randn(100, 4), "require_full_fhe": True}
    )
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 4))
    error = find_cause(info.value, fhe_backend.UnsupportedOpError)
    assert error is not None, repr(info.value)
    assert isinstance(error, fhe_backend.FheBackendError)
    _assert_names_op_module_and_line(str(error))
    assert "require_full_fhe" in str(error)


REJECTED_BY_VALIDATORS = {
    "reduction over the batch dim": (lambda x, y: x.relu().sum(dim=0, keepdim=True) + y, "dim 0"),
    "atan2 of two encrypted tensors": (lambda x, y: torch.atan2(x, y + 3), "independently encrypted"),
    "softmax over the batch dim": (lambda x, y: torch.softmax(x, dim=0) * y, "dim 0"),
    "a 0-d value of the whole batch": (lambda x, y: torch.relu(y + x.sum(0).mean()), "whole batch"),
    "a vector of the whole batch": (lambda x, y: torch.relu(y * 2 - x.sum(0)) * 0.5, "whole batch"),
}


@pytest.mark.parametrize("name", sorted(REJECTED_BY_VALIDATORS))
def test_nodes_a_validator_rejects_stay_eager_with_the_reason(name):
    fn, reason = REJECTED_BY_VALIDATORS[name]
    inputset = (grid_inputs((3,), 4, seed=0), grid_inputs((3,), 4, seed=1))
    compiled = compile_fhe(fn, inputset, n_bits=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compiled(inputset[0][2:6], inputset[1][2:6])
    messages = [str(w.message) for w in caught if "instead of FHE" in str(w.message)]
    assert any(reason in message for message in messages), messages
    expected = fn(inputset[0][2:6], inputset[1][2:6])
    assert float((result - expected).abs().max()) <= quantization_tolerance(expected, 4, steps=2)


def test_lookup_over_16_bits_raises_bit_width_error_before_concrete(monkeypatch):
    from concrete import fhe

    def concrete_must_not_run(*args, **kwargs):
        raise AssertionError("Concrete was called before the bit-width check")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 2), nn.ReLU()).eval()
    inputset = torch.randn(100, 64)
    with monkeypatch.context() as patch:
        patch.setattr(fhe.Compiler, "compile", concrete_must_not_run)
        compiled = compile_fhe(model, inputset, n_bits=8)
        with pytest.raises(Exception) as info:
            compiled(inputset[:2])
    error = find_cause(info.value, fhe_backend.BitWidthError)
    assert error is not None, repr(info.value)
    assert isinstance(error, ValueError)
    message = str(error)
    for words in ("node 'relu'", "-bit input", "n_bits", "rounding_threshold_bits"):
        assert words in message, message
    bits = int(message.split("-bit input")[0].split()[-1])
    assert bits > 16
    # the advice works: rounding the accumulator compiles the same model
    rounded = compile_fhe(model, inputset, n_bits=8, rounding_threshold_bits=6)
    assert rounded(inputset[:2]).shape == (2, 2)
    assert fhe_backend.partitions(rounded)[0].statistics["max_tlu_bit_width"] <= 6
