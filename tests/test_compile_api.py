"""The Concrete-ML-compatible compile API (`fhe_backend.compile`): examples, parameters, errors."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from fhe_backend import NotCompiledError, OptionError, UnsupportedOpError
from fhe_backend.compile import (
    build_quantized_module,
    compile_brevitas_qat_model,
    compile_onnx_model,
    compile_torch_model,
    convert_torch_tensor_or_numpy_array_to_numpy_array,
    has_any_qnn_layers,
)
from tests.harness import quantization_tolerance

N_FEAT = 12


class QATSimpleNet(nn.Module):
    """The seed's "Using Torch" example, as written (3-bit Brevitas layers)."""

    def __init__(self, n_hidden, n_bits=3):
        super().__init__()
        import brevitas.nn as qnn

        self.quant_inp = qnn.QuantIdentity(bit_width=n_bits, return_quant_tensor=True)
        self.fc1 = qnn.QuantLinear(N_FEAT, n_hidden, True, weight_bit_width=n_bits, bias_quant=None)
        self.quant2 = qnn.QuantIdentity(bit_width=n_bits, return_quant_tensor=True)
        self.fc2 = qnn.QuantLinear(n_hidden, n_hidden, True, weight_bit_width=n_bits, bias_quant=None)
        self.quant3 = qnn.QuantIdentity(bit_width=n_bits, return_quant_tensor=True)
        self.fc3 = qnn.QuantLinear(n_hidden, 2, True, weight_bit_width=n_bits, bias_quant=None)

    def forward(self, x):
        x = self.quant_inp(x)
        x = self.quant2(torch.relu(self.fc1(x)))
        x = self.quant3(torch.relu(self.fc2(x)))
        x = self.fc3(x)
        return x


class SimpleNet(nn.Module):
    """The post-training counterpart of QATSimpleNet (plain torch layers)."""

    def __init__(self, n_hidden, n_in=N_FEAT):
        super().__init__()
        self.fc1 = nn.Linear(n_in, n_hidden)
        self.fc2 = nn.Linear(n_hidden, n_hidden)
        self.fc3 = nn.Linear(n_hidden, 2)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class TwoInputs(nn.Module):
    """relu(fc(x)) + y: the second input may be clear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, y):
        return torch.relu(self.fc(x)) + y


def _eager(model, *x):
    with torch.no_grad():
        return model(*[torch.as_tensor(v, dtype=torch.float32) for v in x]).numpy()


@pytest.fixture(scope="module")
def ptq():
    """A post-training compiled SimpleNet (6 bits) with its inputset."""
    torch.manual_seed(1)
    model = SimpleNet(16).eval()
    inputset = torch.randn(200, N_FEAT)
    return model, inputset, compile_torch_model(model, inputset, n_bits=6)


@pytest.fixture(scope="module")
def qat_example():
    """The seed example: QATSimpleNet(30) compiled with compile_brevitas_qat_model."""
    torch.manual_seed(2)
    torch_input = torch.randn(100, N_FEAT)
    torch_model = QATSimpleNet(30)
    quantized_module = compile_brevitas_qat_model(torch_model, torch_input)
    return torch_model, quantized_module


def test_seed_qat_example_matches_brevitas(qat_example):
    torch_model, quantized_module = qat_example
    x_test = np.random.default_rng(0).normal(size=(20, N_FEAT))
    simulated = quantized_module.forward(x_test, fhe="simulate")
    clear = quantized_module.forward(x_test, fhe="disable")
    expected = _eager(torch_model, x_test)
    assert simulated.shape == expected.shape == (20, 2)
    np.testing.assert_array_equal(simulated, clear)
    # Brevitas' own scales and integers are used: equal up to float rounding and the float bias,
    # which the circuit adds rounded to the output step (so that clients never see the bias)
    half_step = 0.5 * float(quantized_module.output_dequantizers[0].scale)
    np.testing.assert_allclose(simulated, expected, atol=half_step + 1e-4 * max(1.0, np.abs(expected).max()))
    assert quantized_module.statistics["max_tlu_bit_width"] <= 8


def test_post_training_counterpart_matches_torch(ptq):
    model, _, quantized_module = ptq
    x_test = torch.randn(30, N_FEAT)
    expected = _eager(model, x_test)
    simulated = quantized_module.forward(x_test, fhe="simulate")
    tolerance = quantization_tolerance(torch.from_numpy(expected), 6, steps=8)
    assert np.abs(simulated - expected).max() <= tolerance


def test_simulate_equals_disable_at_default_p_error(ptq):
    _, _, quantized_module = ptq
    x_test = np.random.default_rng(1).normal(size=(10, N_FEAT))
    np.testing.assert_array_equal(
        quantized_module.forward(x_test, fhe="simulate"), quantized_module.forward(x_test, fhe="disable")
    )


def test_quantization_steps_compose_to_forward(ptq):
    _, _, quantized_module = ptq
    x_test = torch.randn(5, N_FEAT)
    q_x = quantized_module.quantize_input(x_test)
    assert q_x.dtype.kind == "i" and q_x.min() >= 0 and q_x.max() <= 2**6 - 1
    q_y = quantized_module.quantized_forward(q_x, fhe="disable")
    y = quantized_module.dequantize_output(q_y)
    np.testing.assert_array_equal(y, quantized_module.forward(x_test.numpy()))
    assert quantized_module.input_quantizers[0].n_bits == 6
    assert len(quantized_module.output_dequantizers) == 1


def test_inputs_of_the_wrong_kind_of_dtype_raise_as_in_concrete_ml(ptq):
    """Floats given to quantized_forward used to run as if they were integers (wrong outputs,
    no error); integers given to a model calibrated on floats raise as in Concrete ML."""
    _, _, quantized_module = ptq
    x_test = np.random.default_rng(2).normal(size=(3, N_FEAT))
    with pytest.raises(TypeError, match="Input values are expected to be integers of dtype"):
        quantized_module.quantized_forward(x_test.astype(np.float32))
    for integers in (x_test.astype(np.int64), torch.from_numpy(x_test).long()):
        with pytest.raises(TypeError, match="Input values are expected to be floating points of dtype"):
            quantized_module.forward(integers)
    quantized_module.forward(x_test.astype(np.float32))  # any float dtype
    with pytest.raises(OptionError, match="allowed modes"):
        quantized_module.forward(x_test, fhe="encrypted")


def test_execute_equals_simulate_on_a_tiny_circuit(insecure_configuration):
    torch.manual_seed(3)
    model = SimpleNet(3, n_in=3).eval()
    quantized_module = compile_torch_model(
        model, torch.randn(100, 3), n_bits=2, rounding_threshold_bits=4, configuration=insecure_configuration
    )
    assert quantized_module.statistics["max_tlu_bit_width"] <= 4
    x_test = np.random.default_rng(2).normal(size=(2, 3))
    np.testing.assert_array_equal(
        quantized_module.forward(x_test, fhe="execute"), quantized_module.forward(x_test, fhe="simulate")
    )


def test_dict_n_bits_sets_each_quantizer():
    torch.manual_seed(4)
    model = SimpleNet(8).eval()
    inputset = torch.randn(100, N_FEAT)
    quantized = build_quantized_module(
        model, inputset, n_bits={"op_inputs": 3, "op_weights": 3, "model_inputs": 7, "model_outputs": 6}
    )
    assert quantized.input_quantizers[0].n_bits == 7
    as_int = build_quantized_module(model, inputset, n_bits=3)
    assert as_int.input_quantizers[0].n_bits == 3
    # 3-bit activations and weights: accumulators are much smaller than at 7 bits
    wide = build_quantized_module(model, inputset, n_bits=7)
    assert max(e["bitwidth"] for e in as_int.lookup_report().values()) < max(
        e["bitwidth"] for e in wide.lookup_report().values()
    )
    with pytest.raises(OptionError, match="missing mandatory keys"):
        build_quantized_module(model, inputset, n_bits={"op_inputs": 3})


def test_rounding_reduces_max_bit_width():
    torch.manual_seed(5)
    model = SimpleNet(16).eval()
    inputset = torch.randn(100, N_FEAT)
    exact = compile_torch_model(model, inputset, n_bits=5)
    rounded = compile_torch_model(
        model, inputset, n_bits=5, rounding_threshold_bits={"n_bits": 4, "method": "approximate"}
    )
    # the table lookups run at 4 bits instead of the accumulators' width, so they cost less
    assert exact.statistics["max_tlu_bit_width"] > 4
    assert rounded.statistics["max_tlu_bit_width"] == 4
    assert rounded.statistics["complexity"] < exact.statistics["complexity"]
    report = rounded.bitwidth_and_range_report()
    assert report and all(entry["bitwidth"] <= 4 for entry in report.values())
    assert any(entry["accumulator_bitwidth"] > 4 for entry in report.values())


def test_clear_input(insecure_configuration):
    torch.manual_seed(6)
    model = TwoInputs().eval()
    inputset = (torch.randn(100, 4), torch.randn(100, 3))
    quantized = compile_torch_model(
        model, inputset, n_bits=3, inputs_encryption_status=["encrypted", "clear"]
    )
    assert quantized.inputs_encryption_status == ("encrypted", "clear")
    signature = next(line for line in quantized.fhe_circuit.mlir.splitlines() if "func.func" in line)
    arguments = re.findall(r"%arg\d+: ([^,)]*)", signature)
    assert len(arguments) == 2 and ["eint" in a for a in arguments] == [True, False]
    x, y = torch.randn(4, 4), torch.randn(4, 3)
    expected = _eager(model, x, y)
    simulated = quantized.forward(x, y, fhe="simulate")
    assert np.abs(simulated - expected).max() <= quantization_tolerance(
        torch.from_numpy(expected), 3, steps=1
    )
    np.testing.assert_array_equal(simulated, quantized.forward(x, y, fhe="disable"))
    concrete_ml_checks = [  # Concrete ML's order and words
        ([], r"Missing arguments from '.*', expected 2 arguments\."),
        (["encrypted"], r"Missing arguments from '.*', expected 2 arguments\."),
        (["encrypted", "clear", "clear"], r"Too many arguments in '.*', expected 2 arguments\."),
        (["encrypted", "random"], r"Unexpected status from '.*', expected 'clear' or 'encrypted'\."),
        (["clear", "clear"], r"At least one input should be encrypted but got .*"),
    ]
    for status, message in concrete_ml_checks:
        with pytest.raises(OptionError, match=message):
            compile_torch_model(model, inputset, n_bits=3, inputs_encryption_status=status)


def test_only_one_of_p_error_and_global_p_error():
    model = SimpleNet(4).eval()
    with pytest.raises(OptionError, match="at most one"):
        compile_torch_model(model, torch.randn(10, N_FEAT), p_error=0.01, global_p_error=0.01)


def test_global_p_error_reaches_the_circuit():
    torch.manual_seed(7)
    model = SimpleNet(4).eval()
    quantized = compile_torch_model(model, torch.randn(100, N_FEAT), n_bits=3, global_p_error=0.05)
    assert quantized.fhe_circuit.global_p_error <= 0.05 + 1e-9


def test_brevitas_and_torch_misuse_errors():
    qat_model = QATSimpleNet(4)
    assert has_any_qnn_layers(qat_model)
    assert not has_any_qnn_layers(SimpleNet(4))
    with pytest.raises(OptionError, match="compile_brevitas_qat_model"):
        compile_torch_model(qat_model, torch.randn(10, N_FEAT))
    with pytest.raises(OptionError, match="compile_torch_model"):
        compile_brevitas_qat_model(SimpleNet(4), torch.randn(10, N_FEAT))


def test_import_qat_accepts_a_brevitas_model():
    torch.manual_seed(8)
    model = QATSimpleNet(6, n_bits=2)
    inputset = torch.randn(100, N_FEAT)
    quantized = build_quantized_module(model, inputset, import_qat=True)
    x_test = torch.randn(10, N_FEAT)
    half_step = 0.5 * float(quantized.output_dequantizers[0].scale)  # the bias, rounded in the circuit
    np.testing.assert_allclose(quantized.forward(x_test), _eager(model, x_test), atol=half_step + 1e-4)


def test_unsupported_operators_are_listed():
    class Cumulative(nn.Module):
        def forward(self, x):
            return torch.cumsum(torch.relu(x), dim=1)

    with pytest.raises(UnsupportedOpError, match="cumsum"):
        compile_torch_model(Cumulative(), torch.randn(10, 4))


def test_build_quantized_module_is_not_compiled_until_compile():
    torch.manual_seed(9)
    model = SimpleNet(8).eval()
    inputset = torch.randn(100, N_FEAT)
    quantized = build_quantized_module(model, inputset, n_bits=4)
    assert not quantized.is_compiled
    x_test = torch.randn(6, N_FEAT)
    clear = quantized.forward(x_test)
    expected = _eager(model, x_test)
    assert np.abs(clear - expected).max() <= quantization_tolerance(torch.from_numpy(expected), 4, steps=2)
    with pytest.raises(NotCompiledError, match="compile"):
        quantized.fhe_circuit  # noqa: B018
    with pytest.raises(NotCompiledError):
        quantized.forward(x_test, fhe="simulate")
    circuit = quantized.compile(inputset)
    assert circuit is quantized.fhe_circuit
    np.testing.assert_array_equal(quantized.forward(x_test, fhe="simulate"), clear)


def test_onnx_model_compiles_like_torch():
    import onnx

    torch.manual_seed(10)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)
    ).eval()
    inputset = torch.randn(100, 1, 6, 6)
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (inputset[:2],),
        buffer,
        dynamo=False,
        opset_version=14,
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
    )
    onnx_model = onnx.load_from_string(buffer.getvalue())
    quantized = compile_onnx_model(onnx_model, inputset, n_bits=4)
    x_test = torch.randn(5, 1, 6, 6)
    expected = _eager(model, x_test)
    simulated = quantized.forward(x_test, fhe="simulate")
    assert np.abs(simulated - expected).max() <= quantization_tolerance(
        torch.from_numpy(expected), 4, steps=2
    )
    np.testing.assert_array_equal(simulated, quantized.forward(x_test, fhe="disable"))


class _ViewSigmoid(nn.Module):
    def forward(self, x):
        return torch.sigmoid(x.view(-1, 1))


class _UnsqueezeRelu(nn.Module):
    def forward(self, x):
        return torch.relu(x.unsqueeze(1))


@pytest.mark.parametrize(
    "make_model",
    [_ViewSigmoid, _UnsqueezeRelu, lambda: nn.Sequential(nn.Linear(5, 5), nn.LogSigmoid(), nn.Linear(5, 5))],
    ids=["reshape-constant", "unsqueeze-constant", "log-sigmoid"],
)
def test_onnx_exports_with_constant_shapes_and_log_sigmoid_compile(make_model):
    """`torch.onnx.export` writes a Reshape's shape and an Unsqueeze's axes as Constant nodes
    (they failed to capture: their values were data-dependent tensors) and LogSigmoid as
    Sigmoid then Log (-inf on the inputset in float32). Both paths give the same program."""
    import onnx

    torch.manual_seed(0)
    model = make_model().eval()
    inputset = torch.empty(200, 5).uniform_(-100, 100)
    buffer = io.BytesIO()
    torch.onnx.export(model, (inputset[:1],), buffer, dynamo=False, opset_version=14)
    onnx_model = onnx.load_from_string(buffer.getvalue())
    assert "Constant" in {n.op_type for n in onnx_model.graph.node} or isinstance(model, nn.Sequential)
    from_onnx = build_quantized_module(onnx_model, inputset, n_bits=4)
    from_torch = build_quantized_module(model, inputset, n_bits=4)
    x_test = torch.empty(20, 5).uniform_(-100, 100)
    np.testing.assert_array_equal(from_onnx.forward(x_test), from_torch.forward(x_test))


def test_show_mlir_verbose_and_artifacts(tmp_path, capsys):
    from concrete import fhe

    torch.manual_seed(11)
    model = SimpleNet(3, n_in=3).eval()
    inputset = torch.randn(100, 3)
    compile_torch_model(model, inputset, n_bits=2, show_mlir=True)
    assert "func.func" in capsys.readouterr().out
    compile_torch_model(model, inputset, n_bits=2, verbose=True)
    printed = capsys.readouterr().out
    assert "[fhe_backend]" in printed and "pbs_count" in printed
    artifacts = fhe.DebugArtifacts(tmp_path / "artifacts")
    compile_torch_model(model, inputset, n_bits=2, artifacts=artifacts)
    assert "FHE" in artifacts.mlir_to_compile
    entry = artifacts.module_artifacts.functions["torch_model"]
    assert "aten.addmm" in entry.source_code
    assert "table lookups" in entry.textual_representations_of_graphs["quantized_program"][0]
    artifacts.export()
    written = {p.name for p in (tmp_path / "artifacts").iterdir()}
    assert "mlir.txt" in written and "torch_model.txt" in written
    with pytest.raises(OptionError, match="DebugArtifacts"):
        compile_torch_model(model, inputset, n_bits=2, artifacts="artifacts/")


def test_convert_torch_tensor_or_numpy_array_to_numpy_array():
    tensor = torch.ones(2, 3, requires_grad=True)
    array = convert_torch_tensor_or_numpy_array_to_numpy_array(tensor)
    assert isinstance(array, np.ndarray) and array.shape == (2, 3)
    same = np.zeros(4)
    assert convert_torch_tensor_or_numpy_array_to_numpy_array(same) is same
    with pytest.raises(OptionError):
        convert_torch_tensor_or_numpy_array_to_numpy_array([1, 2])


def test_rounding_with_mono_parameters_warns_as_in_concrete_ml():
    from concrete import fhe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    configuration = fhe.Configuration(parameter_selection_strategy=fhe.ParameterSelectionStrategy.MONO)
    inputset = torch.randn(100, 3)
    with pytest.warns(
        UserWarning, match="set the optimization strategy to multi-parameter when using rounding"
    ):
        compile_torch_model(model, inputset, n_bits=3, rounding_threshold_bits=3, configuration=configuration)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compile_torch_model(model, inputset, n_bits=3, configuration=configuration)
    assert not any("multi-parameter" in str(w.message) for w in caught)
