"""Everyday inputset and call mistakes: fixed where the intent is clear, else a clear error."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fhe_backend

INPUTSET = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()


def _run(model, inputset, x, **options):
    compiled = torch.compile(
        model, backend="fhe", options={"inputset": inputset, "n_bits": 4, "fhe": "disable", **options}
    )
    with torch.no_grad():
        return compiled(x)


def test_float64_inputset_is_cast_to_the_traced_dtype():
    """torch.tensor(numpy_array) gives float64: same result as the float32 inputset."""
    model, x = _model(), INPUTSET[:5]
    expected = _run(model, INPUTSET, x)
    torch._dynamo.reset()
    assert torch.equal(_run(model, torch.tensor(INPUTSET.numpy().astype(np.float64)), x), expected)


def test_list_of_single_samples_is_an_inputset():
    model, x = _model(), INPUTSET[:5]
    expected = _run(model, INPUTSET, x)
    torch._dynamo.reset()
    assert torch.equal(_run(model, [row for row in INPUTSET], x), expected)


def test_wrong_feature_count_names_the_inputset_and_shapes():
    with pytest.raises(fhe_backend.OptionError, match=r"inputset.*\(200, 5\).*\(N, 4\)"):
        _run(_model(), torch.randn(200, 5), INPUTSET[:2])


def test_integer_inputset_for_a_float_model_is_refused():
    with pytest.raises(fhe_backend.OptionError, match="dtype torch.int64"):
        _run(_model(), torch.randint(0, 3, (200, 4)), INPUTSET[:2])


def test_training_mode_says_call_eval():
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.2), nn.ReLU(), nn.Linear(6, 2)).train()
    with pytest.raises(fhe_backend.OptionError, match=r"model.eval\(\)"):
        _run(model, INPUTSET, INPUTSET[:2])


def test_inputs_outside_the_calibration_range_warn_once():
    model = _model()
    compiled = torch.compile(
        model, backend="fhe", options={"inputset": INPUTSET, "n_bits": 4, "fhe": "disable"}
    )
    with torch.no_grad():
        compiled(INPUTSET[:3])
        with pytest.warns(UserWarning, match=r"8 of 8 values .* outside the calibration range"):
            compiled(torch.full((2, 4), 100.0))
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="fhe_backend")
            compiled(torch.full((2, 4), 100.0))


def test_two_modules_of_one_class_with_their_own_inputsets():
    """Dynamo compares the options of both compilations; tensors in them must not crash it."""
    first, second = _model(), nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = INPUTSET[:3]
    out_first = _run(first, INPUTSET.clone(), x, n_bits=6)
    out_second = _run(second, INPUTSET.clone(), x, n_bits=6)
    for model, out in ((first, out_first), (second, out_second)):
        expected = model(x).detach()
        assert float((out - expected).abs().max()) <= 4 * float(expected.max() - expected.min()) / 63


def test_requires_grad_input_warns_that_gradients_stop():
    compiled = torch.compile(
        _model(), backend="fhe", options={"inputset": INPUTSET, "n_bits": 4, "fhe": "disable"}
    )
    x = INPUTSET[:3].clone().requires_grad_(True)
    with pytest.warns(UserWarning, match="do not propagate gradients"):
        out = compiled(x)
    assert not out.requires_grad
