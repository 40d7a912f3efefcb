"""QAT: Brevitas models compile as one graph with Brevitas' own quantizers (no re-calibration)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import fhe_backend
from fhe_backend.benchmarks.models import qat_simple_net as QATSimpleNet  # the seed's network, 3-bit
from fhe_backend.qat import has_any_qnn_layers, prepare_qat_model
from tests.harness import compile_fhe, digits_split

qnn = pytest.importorskip("brevitas.nn")

N_FEAT, N_CLASSES, N_BITS = 64, 10, 3


class QATConvNet(nn.Module):
    """QuantConv2d, QuantConv1d, QuantReLU and QuantLinear, plain tensors between layers."""

    def __init__(self):
        super().__init__()
        self.quant_inp = qnn.QuantIdentity(bit_width=N_BITS, return_quant_tensor=False)
        self.conv2d = qnn.QuantConv2d(1, 2, 3, padding=1, weight_bit_width=N_BITS, bias_quant=None)
        self.relu1 = qnn.QuantReLU(bit_width=N_BITS, return_quant_tensor=False)
        self.conv1d = qnn.QuantConv1d(2, 2, 3, stride=2, weight_bit_width=N_BITS, bias_quant=None)
        self.relu2 = qnn.QuantReLU(bit_width=N_BITS, return_quant_tensor=False)
        self.fc = qnn.QuantLinear(2 * 31, N_CLASSES, True, weight_bit_width=N_BITS, bias_quant=None)

    def forward(self, x):
        x = self.relu1(self.conv2d(self.quant_inp(x.reshape(-1, 1, 8, 8))))
        x = self.relu2(self.conv1d(x.reshape(-1, 2, 64)))
        return self.fc(x.flatten(1))


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(epochs):
        for start in range(0, len(x), 64):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[start : start + 64]), y[start : start + 64])
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    x_train, x_test, y_train, y_test = digits_split()
    return torch.tensor(x_train), torch.tensor(x_test), torch.tensor(y_train), y_test


@pytest.fixture(scope="module")
def simple_net(digits):
    x_train, x_test, y_train, _ = digits
    torch.manual_seed(0)
    model = _train(QATSimpleNet(), x_train, y_train, epochs=3)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = compile_fhe(model, x_train, fhe="simulate")
    with torch.no_grad():
        simulated = compiled(x_test)
    # keep the partitions: the autouse fixture resets dynamo (and its compiled graphs) per test
    return model, fhe_backend.partitions(compiled), simulated, dict(counters["graph_break"])


def test_has_any_qnn_layers():
    assert has_any_qnn_layers(QATSimpleNet())
    assert not has_any_qnn_layers(nn.Sequential(nn.Linear(4, 2), nn.ReLU()))
    assert has_any_qnn_layers(nn.Sequential(nn.Linear(4, 2), torch.ao.quantization.FakeQuantize()))


def test_brevitas_model_is_one_graph_and_one_partition(simple_net):
    _, partitions, _, graph_breaks = simple_net
    assert not graph_breaks
    assert len(partitions) == 1
    fake_quants = [
        n for n in partitions[0].graph_module.graph.nodes if n.target == torch.ops.fhe.fake_quant.default
    ]
    assert len(fake_quants) == 3


def test_simulate_predictions_equal_brevitas(simple_net, digits):
    model, _, simulated, _ = simple_net
    _, x_test, _, y_test = digits
    with torch.no_grad():
        expected = model(x_test)
    agreement = float((simulated.argmax(1) == expected.argmax(1)).float().mean())
    assert agreement >= 0.99
    assert float((expected.argmax(1).numpy() == y_test).mean()) > 0.5  # the model did learn


def test_circuit_integers_are_brevitas_integers(simple_net, digits):
    model, partitions, simulated, _ = simple_net
    _, x_test, _, _ = digits
    program = partitions[0].program
    with torch.no_grad():
        brevitas_input = model.quant_inp(x_test)
        expected = model(x_test)
    # the circuit input is Brevitas' integer input (stored shifted to unsigned)
    (q_input,) = program.quantize_inputs(x_test)
    quantizer = program.input_quantizers[0]
    assert quantizer.scale == pytest.approx(float(brevitas_input.scale))
    shift = int(quantizer.zero_point) - int(brevitas_input.zero_point)
    np.testing.assert_array_equal(q_input - shift, brevitas_input.int().numpy())
    # the output is Brevitas' integer accumulator times Brevitas' scales, on a 2**k times finer
    # step for the float bias, which the circuit adds rounded (so that clients never see it)
    with torch.no_grad():
        output_scale = float(model.quant3(torch.zeros(1, 30)).scale) * float(model.fc3.quant_weight().scale)
    (bias_bits,) = program.output_bias_bits.values()
    assert bias_bits > 0
    assert np.all(np.isclose(program.output_dequantizers[0].scale * 2**bias_bits, output_scale))
    tolerance = 0.5 * output_scale / 2**bias_bits + 1e-4 * float(expected.abs().max())
    assert float((simulated - expected).abs().max()) <= tolerance


def test_bit_widths_follow_brevitas(simple_net):
    _, partitions, _, _ = simple_net
    statistics = partitions[0].statistics
    # 3-bit activations x 3-bit weights over 64 inputs: |acc| <= 64 * 4 * 3 (11 bits with sign)
    bound = 1 + math.ceil(math.log2(N_FEAT * 2 ** (N_BITS - 1) * (2 ** (N_BITS - 1) - 1)))
    assert statistics["max_bit_width"] <= bound
    assert statistics["pbs_count"] == 2 * 30  # two requantizations of 30 neurons, no input lookup


def test_return_quant_tensor_false_conv_relu_model(digits):
    x_train, x_test, y_train, _ = digits
    torch.manual_seed(0)
    model = _train(QATConvNet(), x_train[:600], y_train[:600], epochs=1)
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = compile_fhe(model, x_train[:200], fhe="simulate")
    with torch.no_grad():
        expected = model(x_test[:40])
        simulated = compiled(x_test[:40])
    assert not counters["graph_break"]
    assert len(fhe_backend.partitions(compiled)) == 1
    assert float((simulated - expected).abs().max()) <= 1e-4 * float(expected.abs().max()) + 1e-6


def test_prepare_qat_model_keeps_eager_results():
    model = QATSimpleNet(n_hidden=8)
    x = torch.rand(5, N_FEAT)
    with torch.no_grad():
        before = model.eval()(x)
        prepared = prepare_qat_model(model)
        after = prepared(x)
    torch.testing.assert_close(after, before)
    # torch.export captures the prepared model as one graph of fake-quants and linear ops
    exported = torch.export.export(prepared, (x,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fhe.fake_quant.default) == 3
    torch.testing.assert_close(exported.module()(x), before)


def _tiny_qat_net(seed: int, features: int, outputs: int, bits: int) -> nn.Module:
    """QuantIdentity -> QuantLinear -> 2-bit QuantReLU, `bits`-bit inputs and weights."""
    torch.manual_seed(seed)
    return nn.Sequential(
        qnn.QuantIdentity(bit_width=bits, return_quant_tensor=True),
        qnn.QuantLinear(features, outputs, True, weight_bit_width=bits, bias_quant=None),
        qnn.QuantReLU(bit_width=2),
    ).eval()


def test_tiny_qat_circuit_execute_equals_simulate(insecure_configuration):
    model = _tiny_qat_net(0, 4, 3, bits=2)
    x = torch.rand(120, 4)
    compiled = compile_fhe(model, x, fhe="simulate", configuration=insecure_configuration)
    with torch.no_grad():
        simulated = compiled(x[:3])
        (partition,) = fhe_backend.partitions(compiled)
        assert partition.statistics["max_tlu_bit_width"] <= 4
        fhe_backend.set_fhe_mode(compiled, "execute")
        executed = compiled(x[:3])
        expected = model(x[:3])
    torch.testing.assert_close(executed, simulated)
    torch.testing.assert_close(simulated, getattr(expected, "value", expected))


@pytest.fixture(scope="module")
def rounded_simple_net(simple_net, digits):
    """The trained QATSimpleNet compiled with 4-bit approximate lookups (shifts aligned)."""
    from fhe_backend.compile import compile_brevitas_qat_model

    model = simple_net[0]
    x_train = digits[0]
    module = compile_brevitas_qat_model(
        model, x_train, rounding_threshold_bits={"n_bits": 4, "method": "approximate"}
    )
    return model, module


def test_rounded_qat_lookups_align_their_grid_with_the_thresholds(rounded_simple_net, digits):
    model, module = rounded_simple_net
    x_train = digits[0]
    program = module.partition.program
    assert set(program.lookup_shifts) <= set(program.rounding_lsbs) and program.lookup_shifts
    for key, shifts in program.lookup_shifts.items():  # one clear shift per position, < one step
        assert shifts.shape == (30,) and 0 <= shifts.min() and shifts.max() < 2 ** program.rounding_lsbs[key]
    with torch.no_grad():
        expected = model(x_train).numpy()
    q_inputs = program.quantize_inputs(x_train)

    def error() -> float:
        (out,) = program.dequantize_outputs(program(*q_inputs))
        return float(np.mean(np.abs(out - expected)))

    aligned = error()
    shifts, program.lookup_shifts = program.lookup_shifts, {}
    try:
        unaligned = error()  # the grid the placement alone gives (the old behaviour)
    finally:
        program.lookup_shifts = shifts
    assert aligned < 0.9 * unaligned
    # the shifts are clear constants of the circuit: disable runs the program with them
    np.testing.assert_allclose(
        np.asarray(module.forward(x_train[:50].numpy(), fhe="disable")),
        program.dequantize_outputs(program(*program.quantize_inputs(x_train[:50])))[0],
    )


def test_the_zero_grid_rounds_the_accumulator_itself(rounded_simple_net, digits):
    """`rounding_grid="zero"` (Concrete ML's grid): the clear shift cancels the placement's
    offset modulo the rounding step, so each lookup reads round(accumulator) to a multiple of
    the step, where the aligned grid moves the edges to the thresholds."""
    from fhe_backend.quantization.program import ZERO_GRID, IntegerProgram

    _, module = rounded_simple_net
    x_train = digits[0]
    aligned = module.partition.program
    program = IntegerProgram(aligned.graph_module, aligned.stats, aligned.settings, aligned.encryption_status)
    program.rounding_grid = ZERO_GRID
    q_inputs = program.quantize_inputs(x_train)
    program.calibrate_rounding(q_inputs)
    assert program.rounding_lsbs == aligned.rounding_lsbs and program.lookup_offsets
    for key, lsbs in program.rounding_lsbs.items():
        shift = program.lookup_shifts.get(key, np.zeros(30, dtype=np.int64))
        assert np.all((program.lookup_offsets.get(key, 0) + shift) % 2**lsbs == 0), key
    # a different program from the aligned one, and the same in disable as it computes
    outputs = program.dequantize_outputs(program(*q_inputs))[0]
    assert not np.array_equal(outputs, aligned.dequantize_outputs(aligned(*q_inputs))[0])


def test_precision_search_narrows_the_qat_output_bias_step(simple_net, digits):
    from fhe_backend.compile import compile_brevitas_qat_model
    from fhe_backend.quantization import precision_search
    from fhe_backend.quantization.program import QAT_BIAS_BITS
    from fhe_backend.quantization.quantizers import bit_width

    model, _, _, _ = simple_net
    x_train = digits[0]
    scored = []
    original = precision_search._Scorer.evaluate

    def recording(self, candidate, base, method):
        scored.append(candidate)
        return original(self, candidate, base, method)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision_search._Scorer, "evaluate", recording)
        module = compile_brevitas_qat_model(
            model,
            x_train,
            rounding_threshold_bits={"n_bits": 6, "method": "approximate"},
            precision_search={"metric": "argmax", "tolerance": 0.02},
        )
    program, choice = module.partition.program, module.partition.program.precision_choice
    assert choice.loss <= choice.bounds_loss + 0.02
    # both rounding grids searched (no range cap: QAT weights are integers already)
    assert {c.rounding_grid for c in scored} == {"aligned", "zero"}
    assert not any(c.range_capped for c in scored)
    assert program.rounding_grid == choice.rounding_grid
    # 4 bits made the output the circuit's widest integer (11 bits for 7); the search takes fewer
    (bias_bits,) = program.output_bias_bits.values()
    assert bias_bits < QAT_BIAS_BITS
    with torch.no_grad():
        output_scale = float(model.quant3(torch.zeros(1, 30)).scale) * float(model.fc3.quant_weight().scale)
    assert np.all(np.isclose(program.output_dequantizers[0].scale * 2**bias_bits, output_scale))
    q_out = program(*program.quantize_inputs(x_train))
    with_four_bits = q_out * 2 ** (QAT_BIAS_BITS - bias_bits)
    max_bit_width = module.partition.statistics["max_bit_width"]
    assert max_bit_width < bit_width(int(with_four_bits.min()), int(with_four_bits.max()))


def test_rounded_qat_output_is_no_wider_than_its_lookups(rounded_simple_net, simple_net, digits):
    """With rounded lookups the bias step is refined only as far as the lookups' width allows;
    without rounding (simple_net) up to QAT_UNROUNDED_OUTPUT_SLACK bits wider than the lookups
    (4 bias bits made the digits QATSimpleNet's circuit 1.62x Concrete ML's, 2 cost 1.00x)."""
    from fhe_backend.quantization.program import QAT_BIAS_BITS, QAT_UNROUNDED_OUTPUT_SLACK
    from fhe_backend.quantization.quantizers import bit_width

    model, module = rounded_simple_net
    x_train = digits[0]
    program = module.partition.program
    (bias_bits,) = program.output_bias_bits.values()
    unrounded = simple_net[1][0]
    (unrounded_bits,) = unrounded.program.output_bias_bits.values()
    assert bias_bits < unrounded_bits <= QAT_BIAS_BITS
    widest_lookup = max(bit_width(low, high) for low, high in unrounded.lookup_ranges.values())
    assert unrounded.statistics["max_bit_width"] <= widest_lookup + QAT_UNROUNDED_OUTPUT_SLACK
    q_out = program(*program.quantize_inputs(x_train))
    output_bits = bit_width(int(q_out.min()), int(q_out.max()))
    statistics = module.partition.statistics
    assert output_bits <= statistics["max_bit_width"] and statistics["max_bit_width"] < output_bits + (
        QAT_BIAS_BITS - bias_bits
    )
    with torch.no_grad():
        output_scale = float(model.quant3(torch.zeros(1, 30)).scale) * float(model.fc3.quant_weight().scale)
    # on the outputs' grid: the bias is rounded to half a step, the rest is the lookups' rounding
    assert np.all(np.isclose(program.output_dequantizers[0].scale * 2**bias_bits, output_scale))


def test_tiny_qat_circuit_with_aligned_exact_rounding_executes_as_disable(insecure_configuration):
    """Per-position shifts before an exact rounding: execute == simulate == disable."""
    model = _tiny_qat_net(1, 6, 4, bits=3)
    x = torch.rand(200, 6)
    options = dict(
        rounding_threshold_bits={"n_bits": 3, "method": "exact"}, configuration=insecure_configuration
    )
    compiled = compile_fhe(model, x, fhe="disable", **options)
    with torch.no_grad():
        disabled = compiled(x[:3])
        (partition,) = fhe_backend.partitions(compiled)
        assert partition.program.lookup_shifts  # the case under test: shifted lookups
        assert partition.statistics["max_tlu_bit_width"] <= 4
        fhe_backend.set_fhe_mode(compiled, "simulate")
        simulated = compiled(x[:3])
        fhe_backend.set_fhe_mode(compiled, "execute")
        executed = compiled(x[:3])
    torch.testing.assert_close(simulated, disabled)
    torch.testing.assert_close(executed, disabled)


@pytest.mark.parametrize("signed, narrow", [(True, True), (True, False), (False, True), (False, False)])
def test_the_input_quantizer_clamps_on_the_client_for_any_range(signed, narrow):
    """The model's input QuantIdentity becomes the client's quantizer, clamping to its own
    integer range (a narrow one too: 7 levels at 3 bits): no lookup re-clamps the encrypted
    input, and the results equal Brevitas' (inputs beyond the range are clamped by both)."""
    from fhe_backend.compile import compile_brevitas_qat_model

    torch.manual_seed(0)
    quant_input = qnn.QuantIdentity(bit_width=3, signed=signed, narrow_range=narrow, return_quant_tensor=True)
    model = nn.Sequential(quant_input, qnn.QuantLinear(4, 2, bias=False, weight_bit_width=3)).eval()
    x = torch.randn(200, 4) * 2
    module = compile_brevitas_qat_model(model, x)
    assert module.statistics["pbs_count"] == 0
    q_max = module.input_quantizers[0].q_max
    assert q_max == (6 if narrow else 7)  # narrow: 7 levels ([-3, 3], or [1, 7] unsigned)
    assert int(np.max(module.quantize_input(x.numpy()))) == q_max  # clamped by the client
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(module.forward(x.numpy(), fhe="simulate"), expected, rtol=1e-5, atol=1e-6)


def test_a_qat_model_whose_input_is_not_quantized_warns():
    """Its first layer sees floats in Brevitas and n_bits['model_inputs'] integers here: the
    results differ, so the compilation says which input and what to add."""
    from fhe_backend.compile import compile_brevitas_qat_model

    torch.manual_seed(0)
    layers = [qnn.QuantLinear(4, 3, bias=True, weight_bit_width=3), qnn.QuantReLU(bit_width=3)]
    x = torch.randn(100, 4)
    with pytest.warns(UserWarning, match="input '.*' of this quantization-aware model is not quantized"):
        compile_brevitas_qat_model(nn.Sequential(*layers).eval(), x)
    quantized_input = nn.Sequential(qnn.QuantIdentity(bit_width=3, return_quant_tensor=True), *layers).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compile_brevitas_qat_model(quantized_input, x)
    assert not any("is not quantized by the model" in str(w.message) for w in caught)


def test_qat_quantizers_round_ties_as_the_float32_model():
    """8 / 5.3333335 is exactly 1.5 in float32 (the model's fake-quant rounds it half to even,
    to 2) but 1.49999996 in float64: the client's input quantizer and the lookups' requantization
    round as the model does (a narrow 3-bit TinyQATCNN agreed with Brevitas on 86% of argmaxes,
    now every intermediate value is Brevitas')."""
    from fhe_backend.lowering.quant import FakeQuantSpec, fake_quant
    from fhe_backend.quantization.quantizers import UniformQuantizer

    spec = FakeQuantSpec(5.333333492279053, 0.0, -3, 3)
    x = torch.tensor([8.0, -8.0, 2.6666667, 13.333334, 24.0])
    scale = torch.tensor(spec.scale, dtype=torch.float32)
    expected = torch.clamp(torch.round(x / scale), -3, 3).numpy()
    assert expected[0] == 2
    np.testing.assert_array_equal(spec.quantize(x.numpy()), expected)
    client = spec.input_quantizer()
    np.testing.assert_array_equal(client.quantize(x.numpy()) + spec.qmin, expected)
    np.testing.assert_array_equal(client.quantize(x.numpy().astype(np.float64)) + spec.qmin, expected)
    assert UniformQuantizer.from_dict(client.to_dict()) == client  # deployment keeps the rounding
    model_values = fake_quant(x, scale, torch.tensor(0.0), -3.0, 3.0)
    np.testing.assert_array_equal((model_values / scale).round().numpy(), expected)
