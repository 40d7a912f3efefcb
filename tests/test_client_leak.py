"""What a client learns from client.zip (issue 16 item 6): not the bias, not each row's max |W|.

The circuit subtracts the output's rounded zero-point itself and gives every output one scale, so
the dequantizer served to clients is ``float = scale * q`` with one number per output. Each test
loads client.zip as a client would (the zip's JSON members and `FHEModelClient`) and looks for
the private layer's bias and row maxima in every number it holds; results must still match
eager torch within a bound derived from the quantization steps.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Iterator, List

import numpy as np
import pytest
import torch

import fhe_backend
from fhe_backend.deployment import FHEModelClient, FHEModelDev, FHEModelServer
from fhe_backend.quantization.quantizers import quantize_weights
from tests.harness import compile_fhe

BIAS = torch.tensor([1.2345, -2.7182, 0.7071, 3.1416])
ROW_FACTORS = torch.tensor([1.0, 3.0, 0.45, 1.7])  # rows of distinct largest |W|
N_BITS = 6


def _private_linear(in_features: int = 6) -> torch.nn.Linear:
    torch.manual_seed(3)
    layer = torch.nn.Linear(in_features, len(BIAS))
    with torch.no_grad():
        layer.weight.mul_(ROW_FACTORS[:, None])
        layer.bias.copy_(BIAS)
    return layer


def _numbers(value) -> Iterator[np.ndarray]:
    """Every numeric array (lists of numbers) and scalar in a JSON document."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        yield np.asarray([float(value)])
    elif isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            yield np.asarray(value, dtype=np.float64)
        for item in value:
            yield from _numbers(item)


def _client_arrays(folder: Path) -> List[np.ndarray]:
    """Every number in every JSON member of client.zip, and the quantizers FHEModelClient loads."""
    arrays: List[np.ndarray] = []
    with zipfile.ZipFile(folder / "client.zip") as archive:
        for name in archive.namelist():
            if name.endswith(".json"):
                arrays.extend(_numbers(json.loads(archive.read(name))))
    processing = FHEModelClient(folder).processing
    for quantizer in [*processing.input_quantizers, *processing.output_dequantizers]:
        arrays.extend(np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in vars(quantizer).values())
    return arrays


def _assert_nothing_private(arrays: List[np.ndarray], layer: torch.nn.Linear) -> None:
    bias = layer.bias.detach().double().numpy()
    row_max = layer.weight.detach().abs().amax(dim=1).double().numpy()
    for array in arrays:
        flat = array.ravel()
        for secret, what in ((bias, "bias"), (row_max, "row max |W|")):
            hits = [s for s in secret if np.any(np.isclose(flat, s, rtol=1e-3, atol=0))]
            assert not hits, f"client.zip holds the private {what} {hits} (array {flat[:8]})"
            if flat.size == secret.size and np.all(flat != 0):
                # the same values up to one factor (a per-row scale is row max / levels * s_in)
                ratio = flat / secret
                assert not np.allclose(ratio, ratio[0], rtol=1e-2), (
                    f"client.zip holds the {what} times a factor"
                )


@pytest.fixture(scope="module")
def leveled(tmp_path_factory):
    """A leveled private Linear with a distinctive bias, saved with FHEModelDev."""
    layer = _private_linear()
    model = torch.nn.Sequential(layer).eval()
    inputset = torch.randn(120, 6)
    compiled = compile_fhe(model, inputset, n_bits=N_BITS)
    with torch.no_grad():
        compiled(inputset[:2])
    partition = fhe_backend.partitions(compiled)[0]
    folder = tmp_path_factory.mktemp("leveled")
    FHEModelDev(folder, partition).save()
    return model, inputset, partition, folder


def test_client_zip_of_a_leveled_layer_hides_bias_and_row_maxima(leveled):
    model, _, partition, folder = leveled
    dequantizer = FHEModelClient(folder).processing.output_dequantizers[0]
    assert np.ndim(dequantizer.scale) == 0 and float(dequantizer.zero_point) == 0.0
    # what the old dequantizer gave away: -scale * zero_point == bias
    assert not np.allclose(-np.asarray(dequantizer.scale) * dequantizer.zero_point, BIAS.numpy(), atol=1e-3)
    _assert_nothing_private(_client_arrays(folder), model[0])


def _error_bound(layer: torch.nn.Linear, x: torch.Tensor, partition) -> np.ndarray:
    """|y - eager| allowed per element: half an input step through |W|, half of twice each row's
    per-channel weight step through |x|, half an output step (the rounded zero-point)."""
    weight = layer.weight.detach().double().numpy()
    input_step = float(partition.program.input_quantizers[0].scale)
    _, channel_steps = quantize_weights(weight, N_BITS, 0)
    x_abs = np.abs(x.double().numpy()).sum(1) + 0.5 * input_step * weight.shape[1]
    output_step = float(partition.program.output_dequantizers[0].scale)
    bound = 0.5 * input_step * np.abs(weight).sum(1) + np.outer(x_abs, channel_steps.ravel())
    return bound + 0.5 * output_step + 1e-9


def test_leveled_results_match_eager_within_quantization_steps(leveled):
    model, inputset, partition, _ = leveled
    x = inputset[:40]
    q = partition.program.quantize_inputs(x)
    simulated = partition.run_integers(q, "simulate")[0]
    np.testing.assert_array_equal(simulated, partition.run_integers(q, "disable")[0])
    floats = partition.program.dequantize_outputs(simulated)[0]
    with torch.no_grad():
        reference = model(x).double().numpy()
    error = np.abs(floats - reference)
    assert np.all(error <= _error_bound(model[0], x, partition)), float(error.max())


def test_client_server_round_trip_with_the_public_dequantizer(leveled):
    model, inputset, partition, folder = leveled
    client, server = FHEModelClient(folder), FHEModelServer(folder)
    x = inputset[:3].double().numpy()
    result = server.run(client.quantize_encrypt_serialize(x), client.get_serialized_evaluation_keys())
    expected = partition.run_integers(partition.program.quantize_inputs(torch.tensor(x)), "simulate")[0]
    np.testing.assert_array_equal(client.deserialize_decrypt(result), expected)
    floats = client.deserialize_decrypt_dequantize(result)
    with torch.no_grad():
        reference = model(torch.tensor(x, dtype=torch.float32)).double().numpy()
    assert np.all(np.abs(floats - reference) <= _error_bound(model[0], torch.tensor(x), partition))


class _Gained(torch.nn.Module):
    """Linear -> ReLU -> private Linear (bias) -> per-channel private gain: lookups and a gain."""

    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(5, 6)
        self.private = _private_linear()
        self.gain = torch.nn.Parameter(torch.tensor([0.5, -1.75, 2.5, 0.8]))

    def forward(self, x):
        return self.private(torch.relu(self.hidden(x))) * self.gain


def test_lookup_circuit_with_a_gain_hides_bias_gain_and_row_maxima(tmp_path):
    torch.manual_seed(0)
    model = _Gained().eval()
    inputset = torch.randn(150, 5)
    compiled = compile_fhe(model, inputset, n_bits=3, rounding_threshold_bits=3)
    with torch.no_grad():
        compiled(inputset[:2])
    partition = fhe_backend.partitions(compiled)[0]
    assert partition.statistics["pbs_count"] > 0
    FHEModelDev(tmp_path, partition).save()
    arrays = _client_arrays(tmp_path)
    _assert_nothing_private(arrays, model.private)
    gain = model.gain.detach().double().numpy()
    assert not any(np.any(np.isclose(a.ravel(), g, rtol=1e-3)) for a in arrays for g in gain)
    dequantizer = FHEModelClient(tmp_path).processing.output_dequantizers[0]
    assert np.ndim(dequantizer.scale) == 0 and float(dequantizer.zero_point) == 0.0
    # simulate equals the integer program on the whole inputset (its extreme samples included)
    q = partition.program.quantize_inputs(inputset)
    np.testing.assert_array_equal(
        partition.run_integers(q, "simulate")[0], partition.run_integers(q, "disable")[0]
    )


def test_only_the_layer_that_reaches_the_output_takes_one_weight_scale(tmp_path):
    """Linear -> Linear: the hidden layer's output is requantized (a lookup) before the last
    layer reads it, so its per-channel scales never reach the client. Only the last layer takes
    per-tensor weights (with more bits); the hidden one keeps its per-channel weights. Both used
    to move, in two calibration runs (the hidden layer's spread hid the last one's)."""
    torch.manual_seed(1)
    hidden = torch.nn.Linear(6, 4)
    with torch.no_grad():
        hidden.weight.mul_(ROW_FACTORS[:, None])
    model = torch.nn.Sequential(hidden, _private_linear(4)).eval()
    inputset = torch.randn(150, 6)
    compiled = compile_fhe(model, inputset, n_bits=N_BITS, rounding_threshold_bits=N_BITS)
    with torch.no_grad():
        compiled(inputset[:2])
    partition = fhe_backend.partitions(compiled)[0]
    program = partition.program
    hidden_node, last_node = sorted(
        {key[0] for key in program.constants if str(key[-1]).startswith("weights")}
    )
    assert set(program.one_scale_nodes) == {last_node}
    hidden_scales = next(
        v[1] for k, v in program.constants.items() if k[0] == hidden_node and str(k[-1]).startswith("weights")
    )
    assert np.ptp(hidden_scales) > 0  # per channel
    FHEModelDev(tmp_path, partition).save()
    _assert_nothing_private(_client_arrays(tmp_path), model[1])
    q = partition.program.quantize_inputs(inputset)
    np.testing.assert_array_equal(
        partition.run_integers(q, "simulate")[0], partition.run_integers(q, "disable")[0]
    )


def test_lora_linear_client_zip_hides_bias_and_column_maxima(tmp_path):
    """A frozen LoRA linear (bias as an input column): its client.zip holds one output scale."""
    from fhe_backend.lora import FheMatmul
    from fhe_backend.settings import FheSettings

    layer = _private_linear(in_features=5)
    matmul = FheMatmul(layer.weight.detach().t(), layer.bias.detach(), name="frozen")
    partition = matmul.compile(FheSettings.from_options({"n_bits": 6}))
    FHEModelDev(tmp_path, partition).save()
    _assert_nothing_private(_client_arrays(tmp_path), layer)
    x = torch.randn(20, 5)
    with torch.no_grad():
        reference = layer(x).double().numpy()
        matmul.mode = "simulate"
        simulated = matmul(x).double().numpy()
    # each row runs scaled to [-1, 1] with the bias columns appended: half an input step through
    # |M|, twice each column's per-channel weight step through |x|, half an output step
    rows, row_scale = (t.double().numpy() for t in matmul.normalize(x))
    circuit = matmul._circuit_matrix().double().numpy()
    input_step = float(partition.program.input_quantizers[0].scale)
    _, column_steps = quantize_weights(circuit, 6, 1)
    output_step = float(partition.program.output_dequantizers[0].scale)
    per_row = 0.5 * input_step * np.abs(circuit).sum(0) + np.outer(
        np.abs(rows).sum(1) + 0.5 * input_step * rows.shape[1], 2 * column_steps.ravel()
    )
    bound = row_scale * (per_row + 0.5 * output_step) + 1e-6
    assert np.all(np.abs(simulated - reference) <= bound), float(np.abs(simulated - reference).max())
