"""Wide programs: any width runs in the clear, circuits fail only at compilation with advice,
Concrete's NoParametersFound never surfaces raw, and >16-bit accumulators run right for real."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fhe_backend
from fhe_backend.backend import compiled_graphs
from fhe_backend.compile import build_quantized_module, compile_torch_model
from fhe_backend.deployment.fhe_client_server import FHEModelClient, FHEModelDev, FHEModelServer

from .harness import quantization_tolerance


def _wide_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 4)).eval()


def test_wide_program_runs_in_the_clear_and_fails_only_as_a_circuit():
    """Linear(256, 64) -> ReLU -> Linear(64, 4) at n_bits=8 needs a 19-bit lookup: `disable`
    works (as Concrete ML's post-training check does), compiling a circuit raises with advice."""
    model, x = _wide_model(), torch.randn(300, 256, generator=torch.Generator().manual_seed(1))
    module = build_quantized_module(model, x, n_bits=8)
    expected = model(x[:8]).detach().numpy()
    actual = module.forward(x[:8].numpy(), fhe="disable")
    assert np.abs(actual - expected).max() <= quantization_tolerance(torch.tensor(expected), 8, steps=4)
    with pytest.raises(fhe_backend.BitWidthError, match="rounding_threshold_bits"):
        compile_torch_model(model, x, n_bits=8)


def test_wide_program_under_torch_compile_defers_its_circuit():
    """torch.compile with fhe='disable' warns that the partition runs in the clear only;
    switching to simulate raises the BitWidthError instead of running something else."""
    model, x = _wide_model(), torch.randn(300, 256, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="runs in the clear only"):
        compiled = torch.compile(model, backend="fhe", options={"inputset": x, "n_bits": 8, "fhe": "disable"})
        with torch.no_grad():
            out = compiled(x[:4])
    expected = model(x[:4]).detach()
    assert float((out - expected).abs().max()) <= quantization_tolerance(expected, 8, steps=4)
    with pytest.raises(fhe_backend.BitWidthError, match="19-bit"), torch.no_grad():
        with fhe_backend.fhe_mode("simulate"):
            compiled(x[:4])


def test_n_bits_range():
    """n_bits=1 is refused; up to 24 bits the program runs in the clear (close to float)."""
    model, x = _wide_model(), torch.randn(200, 256, generator=torch.Generator().manual_seed(1))
    with pytest.raises(fhe_backend.OptionError, match=r"\[2, 24\]"):
        build_quantized_module(model, x, n_bits=1)
    module = build_quantized_module(model, x, n_bits=20)
    expected = model(x[:4]).detach().numpy()
    assert np.abs(module.forward(x[:4].numpy(), fhe="disable") - expected).max() < 1e-4


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.fc = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Linear(32, 3)

    def forward(self, x):
        return self.fc((torch.relu(self.norm(self.conv(x))) + x).flatten(1))


def _residual_and_inputs():
    """A `_Residual` with drawn BatchNorm statistics, in eval mode, and 200 inputs for it: at
    n_bits 7 and no rounding Concrete finds no crypto parameters for it."""
    torch.manual_seed(0)
    model = _Residual()
    with torch.no_grad():
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    return model.eval(), torch.randn(200, 2, 4, 4, generator=torch.Generator().manual_seed(1))


def test_no_parameters_found_retries_with_rounding():
    """Conv -> BatchNorm -> ReLU -> residual add -> Linear at n_bits=7 and no rounding has no
    crypto parameters in Concrete: the backend warns, rounds ('auto') and compiles."""
    model, x = _residual_and_inputs()
    compiled = torch.compile(model, backend="fhe", options={"inputset": x, "n_bits": 7, "fhe": "simulate"})
    with pytest.warns(UserWarning, match="no crypto parameters"), torch.no_grad():
        out = compiled(x[:8])
    (partition,) = fhe_backend.partitions(compiled)
    assert partition.settings.rounding_threshold_bits is not None
    with torch.no_grad():
        expected = model(x[:8])
        with fhe_backend.fhe_mode("disable"):
            disabled = compiled(x[:8])
    # 'auto' keeps the mean output error within 1% of the span; the max within 12 output steps
    assert float((disabled - expected).abs().max()) <= quantization_tolerance(expected, 7, steps=12)
    assert float((out - disabled).abs().max()) <= quantization_tolerance(expected, 7, steps=12)
    # were there still no parameters, the advice asks for less than what the lookups have now
    widest = partition.statistics["max_tlu_bit_width"]
    advice = str(partition._no_parameters_error())
    assert f"'rounding_threshold_bits' ('auto' was tried) such as {widest - 1}" in advice
    assert "'n_bits' (now 7: try 6;" in advice
    partition.settings = partition.settings.replace(rounding_threshold_bits=5)
    advice = str(partition._no_parameters_error())
    assert "(now 5: try 4, or {'n_bits': 5, 'method': 'approximate'})" in advice


def test_a_rounding_fallback_reaches_the_graphs_of_every_batch_size():
    """Dynamo compiles a graph per batch size (1 is specialised). One graph falling back to
    "auto" rounding (no crypto parameters unrounded) used to leave the others unrounded, so a
    sample's `disable` result depended on its batch. The session's graphs of the same partition
    now round alike: those sharing its program (equal signatures), those waiting for their
    circuit at once, those compiled later from the start."""
    model, x = _residual_and_inputs()
    compiled = torch.compile(model, backend="fhe", options={"inputset": x, "n_bits": 7, "fhe": "disable"})
    with torch.no_grad():
        compiled(x[:1])  # the batch-1 graph, its circuit deferred
        fhe_backend.set_fhe_mode(compiled, "simulate")
        with pytest.warns(UserWarning, match="no crypto parameters"):
            compiled(x[:8])  # another graph: compiles, falls back to "auto"
        fhe_backend.set_fhe_mode(compiled, "disable")
        batch = compiled(x[:8])
        assert torch.equal(compiled(x[:1]), batch[:1])
        assert torch.equal(compiled(x[2:5]), batch[2:5])  # a graph compiled after the fallback
    graphs = compiled_graphs(compiled)
    roundings = {(p.primary or p).settings.rounding_threshold_bits for g in graphs for p in g.partitions}
    assert len(graphs) >= 2 and None not in roundings


def _stacked_linears() -> nn.Module:
    """Linear(3, 2) -> Linear(2, 5) whose output rows' weight scales spread 16x (the
    differential generator's seed 603)."""
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 5)).eval()
    weights = [
        [[0.28392407, 0.20476411, 0.25743714], [-0.24290401, 0.11025994, -0.09632496]],
        [-0.32385972, 0.20079441],
        [[0.04442411, -0.00710552], [0.20991001, 0.81120658], [-0.0986437, 0.29679322]]
        + [[-0.06205035, -0.27320781], [0.72835857, -0.89059788]],
        [0.15526330, -0.42755637, 0.36810172, 0.01822711, -0.08837502],
    ]
    with torch.no_grad():
        for parameter, value in zip(model.parameters(), weights):
            parameter.copy_(torch.tensor(value))
    return model


def test_no_parameters_found_narrows_the_output_layers_extra_weight_bits():
    """The output layer takes per-tensor weights with up to 4 more bits (one scale for the
    client). At n_bits 6, exact rounding 8 and p_error 2**-40 its 4 extra bits leave Concrete without crypto
    parameters: the backend warns, gives up one bit and compiles; the program still equals the
    circuit and stays within quantization error of eager torch."""
    model = _stacked_linears()
    generator = torch.Generator().manual_seed(603)
    x = torch.cat([torch.randn(108, 3, generator=generator), torch.randn(24, 3, generator=generator)])
    options = {"n_bits": 6, "rounding_threshold_bits": {"n_bits": 8, "method": "exact"}, "p_error": 2**-40}
    with pytest.warns(
        UserWarning, match=r"retrying with output_extra_weight_bits=3: the output layer\(s\) 'addmm_1'"
    ):
        quantized = compile_torch_model(model, x, **options)
    partition = quantized.partition
    assert partition.settings.output_extra_weight_bits == 3
    assert partition.program.one_scale_nodes == {"addmm_1": 3}
    simulated = quantized.forward(x[:20].numpy(), fhe="simulate")
    disabled = quantized.forward(x[:20].numpy(), fhe="disable")
    assert np.array_equal(simulated, disabled)
    expected = model(x[:20]).detach()
    assert np.abs(disabled - expected.numpy()).max() <= quantization_tolerance(expected, 6, steps=2)
    # asked for at once (the option), no fallback is needed
    options = {"inputset": x, "fhe": "simulate", "output_extra_weight_bits": 3, **options}
    compiled = torch.compile(model, backend="fhe", options=options)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("error", message=".*no crypto parameters")
        simulated = compiled(x[:20])
        (partition,) = fhe_backend.partitions(compiled)
        assert partition.program.one_scale_nodes == {"addmm_1": 3}
        with fhe_backend.fhe_mode("disable"):
            assert torch.equal(compiled(x[:20]), simulated)


def test_no_parameters_found_requantizes_average_pool_sums():
    """With approximate rounding an average pool's window sum feeds the next linear op without
    a lookup. Feeding the output layer here, it leaves Concrete without crypto parameters at
    n_bits 7, approximate rounding 7: the backend warns, requantizes the sums and compiles."""
    torch.manual_seed(58)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2),
        nn.Sigmoid(),
        nn.Conv2d(4, 4, 1),
        nn.Sigmoid(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(36, 3),
    ).eval()
    x = torch.randn(100, 2, 6, 6)
    options = {
        "n_bits": 7,
        "rounding_threshold_bits": {"n_bits": 7, "method": "approximate"},
        "p_error": 2**-40,
    }
    with pytest.warns(UserWarning, match="retrying with pool_sum_bits=0: the window sums of 'avg_pool2d'"):
        quantized = compile_torch_model(model, x, **options)
    assert quantized.partition.settings.pool_sum_bits == 0 and not quantized.partition.program.pool_sums
    expected = model(x[:20]).detach()
    disabled = quantized.forward(x[:20].numpy(), fhe="disable")
    simulated = quantized.forward(x[:20].numpy(), fhe="simulate")
    tolerance = quantization_tolerance(expected, 7, steps=4)
    assert np.abs(disabled - expected.numpy()).max() <= tolerance
    assert np.abs(simulated - disabled).max() <= tolerance
    # asked for at once (the option), the same program in the clear, and no fallback
    compiled = torch.compile(
        model, backend="fhe", options={"inputset": x, "fhe": "disable", "pool_sum_bits": 0, **options}
    )
    with torch.no_grad():
        assert np.array_equal(compiled(x[:20]).numpy(), disabled.astype(np.float32))


def test_no_parameters_for_a_wide_output_fed_by_lookups_names_the_output():
    """A sigmoid feeding a 1024-input linear layer at n_bits 7: the output needs 19 bits, and
    Concrete encodes the lookups that feed it at that width, so no rounding helps (17 and 18
    bits compiled). The error says which output is how wide, and what narrows it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 1024), nn.Sigmoid(), nn.Linear(1024, 3)).eval()
    rounding = {"n_bits": 5, "method": "approximate"}
    with pytest.raises(fhe_backend.BitWidthError) as raised:
        compile_torch_model(model, torch.randn(100, 3), n_bits=7, rounding_threshold_bits=rounding)
    assert isinstance(raised.value, fhe_backend.NoParametersFoundError)
    assert isinstance(raised.value, RuntimeError)  # what Concrete and Concrete ML raise here
    message = str(raised.value)
    assert "NoParametersFound" in message and "Its output 'addmm_1' is 19 bits wide" in message
    assert "fewer 'op_weights' or 'op_inputs' bits" in message


def test_accumulators_over_16_bits_execute_equals_simulate(insecure_configuration):
    """A 17-bit accumulator rounded to a 4-bit lookup: execute (real keys) == simulate ==
    disable exactly (exact rounding, p_error 2**-40)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    x = torch.randn(300, 48, generator=torch.Generator().manual_seed(1)) * 2
    compiled = torch.compile(
        model,
        backend="fhe",
        options={
            "inputset": x,
            "n_bits": 8,
            "rounding_threshold_bits": 4,
            "fhe": "disable",
            "configuration": insecure_configuration,
            "p_error": 2**-40,
        },
    )
    with torch.no_grad():
        disabled = compiled(x[:2])
        (partition,) = fhe_backend.partitions(compiled)
        assert partition.statistics["max_bit_width"] > 16
        with fhe_backend.fhe_mode("simulate"):
            simulated = compiled(x[:2])
        with fhe_backend.fhe_mode("execute"):
            executed = compiled(x[:2])
    assert torch.equal(disabled, simulated) and torch.equal(simulated, executed)


@pytest.mark.parametrize("rounding", [None, 4, {"n_bits": 4, "method": "approximate"}])
def test_inputs_beyond_what_a_lookup_holds_warn_that_fhe_wraps(rounding):
    """Each input stays in its calibrated range, but together they push the first layer's
    accumulator far beyond the calibrated one: under FHE that value wraps around (simulate
    differs from disable), so every mode warns, naming the layer (simulate here; disable in
    test_differential's wrap tests); inputs like the inputset's do not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 0.9]]))
    t = torch.linspace(-1, 1, 200)
    inputset = torch.stack([t, -t + 0.05 * torch.randn(200)], dim=1)  # x0 + x1 stays near 0
    module = compile_torch_model(model, inputset, n_bits=4, rounding_threshold_bits=rounding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.forward(inputset[:50].numpy())  # the inputset's own kind of inputs: no warning
    beyond = np.array([[1.0, 1.0], [-1.0, -1.0]])
    with pytest.warns(UserWarning, match=r"lookup reading '0/addmm' .* gets integers .* wrap around"):
        simulated = module.forward(beyond, fhe="simulate")
    clear = module.forward(beyond)
    assert not np.array_equal(clear, simulated)  # the wrap the warning is about


def test_outputs_a_little_beyond_their_calibrated_range_decrypt_as_themselves(
    insecure_configuration, tmp_path
):
    """x0 - x1 stays within [0.2, 0.5] on the inputset, so Concrete types the output unsigned.
    Inputs within each input's own range can take it to 0 or below: Concrete decrypts such a
    value modulo a power of two (-1 as 2**(bits + 1) - 1, a huge float), and before the
    decryption window (`OutputDequantizer.decrypted`) simulate and execute returned it so,
    silently. An approximate rounding's slip does the same to a max or a ReLU at 0 (found on
    random graph 124: 337 off disable on an output span of 34)."""
    model = nn.Linear(2, 1).eval()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
        model.bias.zero_()
    x0 = torch.linspace(0.2, 1.0, 120)
    inputset = torch.stack([x0, x0 - 0.2 - 0.3 * torch.rand(120)], dim=1)
    module = compile_torch_model(model, inputset, n_bits=6, configuration=insecure_configuration)
    (output,) = module.partition.circuit.graph.ordered_outputs()
    assert not output.output.dtype.is_signed and output.bounds[0] > 0
    beyond = np.array([[0.3, 0.3], [0.25, 0.3], [0.9, 0.35]], dtype=np.float32)  # 0, -0.05, 0.55
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the window: nothing wraps, no warning
        clear = module.forward(beyond)
    np.testing.assert_allclose(clear[:, 0], [0.0, -0.05, 0.55], atol=0.02)
    assert np.array_equal(module.forward(beyond, fhe="simulate"), clear)
    assert np.array_equal(module.forward(beyond, fhe="execute"), clear)  # no lookup: keys in seconds
    FHEModelDev(tmp_path, module).save()  # the deployed client decrypts the same way
    client, server = FHEModelClient(tmp_path), FHEModelServer(tmp_path)
    result = server.run(client.quantize_encrypt_serialize(beyond), client.get_serialized_evaluation_keys())
    assert np.array_equal(client.deserialize_decrypt_dequantize(result), clear)
    low, modulus = module.output_dequantizers[0].window
    far = low - modulus // 4  # beyond the window a clear run says that it wraps
    assert module.output_dequantizers[0].decrypted(np.array([far])) != far
