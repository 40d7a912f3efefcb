"""`fhe-backend demo`: both configurations (exact, fast), each run for real on one sample."""

from __future__ import annotations

import pytest
import torch

from fhe_backend.cli import main
from fhe_backend.demo import (
    CONFIGURATIONS,
    EXACT_OPTIONS,
    FAST_OPTIONS,
    compile_and_measure,
    describe,
    load_digits_split,
    run_encrypted,
    train,
)
from fhe_backend.settings import FheSettings


def test_demo_command_parses_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--no-execute" in capsys.readouterr().out


def test_demo_shows_exact_and_fast_configurations():
    exact = FheSettings().replace(**EXACT_OPTIONS).rounding_threshold_bits
    fast = FheSettings().replace(**FAST_OPTIONS).rounding_threshold_bits
    assert list(CONFIGURATIONS) == ["exact", "fast"]
    assert exact.method == "exact" and not exact.auto
    assert fast.method == "approximate" and fast.auto
    assert describe(EXACT_OPTIONS) == "n_bits 6, rounding 6 exact"
    assert describe(FAST_OPTIONS) == "n_bits 6, rounding 'auto' approximate"


@pytest.fixture(scope="module")
def digits_mlp():
    data = load_digits_split()
    x_train, x_test, y_train, y_test = data
    # the demo's functions on a narrow MLP: the same code path with a cheap circuit
    model = torch.nn.Sequential(torch.nn.Linear(64, 6), torch.nn.ReLU(), torch.nn.Linear(6, 10))
    model = train(model, x_train[:300], y_train[:300], epochs=5)
    return model, (x_train[:200], x_test[:40], y_train[:200], y_test[:40])


@pytest.mark.parametrize("method", ["exact", "approximate"])
def test_one_sample_runs_encrypted_in_each_rounding_method(digits_mlp, insecure_configuration, method):
    """The demo's measuring functions on a small circuit (3-bit, lookups of at most 4 bits):
    real keys, one encrypted sample; exact rounding equals simulate bit for bit."""
    model, data = digits_mlp
    options = {
        "n_bits": 3,
        "rounding_threshold_bits": {"n_bits": 4, "method": method},
        "configuration": insecure_configuration,
    }
    compiled, figures = compile_and_measure("MLP", model, data, options)
    assert figures["pbs_count"] > 0 and figures["max_tlu_bit_width"] <= 4
    assert 0.0 <= figures["simulate_accuracy"] <= 1.0
    result = run_encrypted(compiled, data[1][:1])
    assert result["keygen_seconds"] >= 0 and result["execute_seconds"] > 0
    if method == "exact":
        assert result["matches_simulate"] and result["max_difference"] == 0.0
    with torch.no_grad():
        assert compiled(data[1][:1]).shape == (1, 10)  # back in simulate after the encrypted run
